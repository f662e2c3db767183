"""``sts-profile``: redundancy analysis across a training run's checkpoints.

    sts-profile analyze runs/dense --out analysis/    # tables, plots, report, schedule.yaml
    sts-profile schedule analysis/ --target-speedup 1.8 -o schedule.yaml

Heavy imports (torch, transformers) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sts_train.clitools import run_app, user_errors, warnings_as_lines

app = typer.Typer(
    help="Measure per-layer and per-visual-token redundancy across checkpoints of a LLaVA-style "
    "training run and derive a stage schedule for sts-train.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Profile a run's redundancy and derive a stage schedule."""


@app.command()
def analyze(
    ckpt_dir: Path = typer.Argument(..., help="Trainer output_dir (checkpoint-N/), a folder of model "
                                    "folders, a run with stage sub-folders, or one model folder."),
    out: Path = typer.Option(..., "--out", help="Output folder (tables, plots, report, schedule.yaml)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Calibration LLaVA JSON (default: the run's data)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder of --data (default: its folder)."),
    samples: int = typer.Option(32, "--samples", help="Calibration samples (a fixed, seeded sample)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per forward."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of random compression."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    probes: bool = typer.Option(True, "--probes/--no-probes", help="Run the layer-skip and token-compression probes."),
    trace: bool = typer.Option(False, "--trace", help="Write one bounded torch.profiler trace (trace/)."),
    attention_layers: Optional[str] = typer.Option(None, "--attention-layers",
                                                   help="Comma-separated decoder layers for text->visual attention (default all)."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Schedule budget: FLOPs speedup, e.g. 1.8."),
    max_loss_increase: Optional[float] = typer.Option(None, "--max-loss-increase",
                                                      help="Schedule budget: tolerated loss increase (default 0.05)."),
    policy: str = typer.Option("profile", "--policy", help="profile (derived) or paper (fixed formula)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Paper policy: skip-probability scale (default 0.5)."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Paper policy: depth slope (default 0.2)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another analysis in --out."),
) -> None:
    """Analyze every checkpoint of a run: tables, plots, report and a derived schedule."""
    with user_errors():
        from sts_profile.analysis import AnalyzeConfig, run_analysis
        from sts_train.errors import StsError

        layers = None
        if attention_layers:
            try:
                layers = tuple(int(x) for x in attention_layers.split(","))
            except ValueError:
                raise StsError(f"--attention-layers {attention_layers!r}: give comma-separated integers, e.g. 0,3,7") from None
        config = AnalyzeConfig(
            ckpt_dir=str(ckpt_dir), out_dir=str(out), data_json=None if data is None else str(data),
            images=None if images is None else str(images), num_samples=samples, batch_size=batch_size,
            seed=seed, device=device, dtype=dtype, probes=probes, trace=trace,
            layers_for_attention=layers, target_speedup=target_speedup,
            max_loss_increase=max_loss_increase, policy=policy, overwrite=overwrite, **_paper_params(policy, alpha, eps),
        )
        result = run_analysis(config)
        if result is not None:
            typer.echo(f"done: {len(result.manifest['checkpoints'])} checkpoints -> {out} "
                       f"(report.html, schedule.yaml, layers/tokens/cost tables)")


def _paper_params(policy: str, alpha: float | None, eps: float | None) -> dict:
    """The given --alpha/--eps; they set the paper formula, so another policy refuses them."""
    from sts_train.errors import StsError

    given = {name: value for name, value in (("alpha", alpha), ("eps", eps)) if value is not None}
    if given and policy != "paper":
        raise StsError(f"--{next(iter(given))} applies to --policy paper only (--policy {policy} derives its rates);"
                       " remove it or pass --policy paper")
    return given


@app.command()
def schedule(
    tables_dir: Path = typer.Argument(..., help="Output folder of `sts-profile analyze`."),
    output: Path = typer.Option(..., "-o", "--output", help="Schedule file to write."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="FLOPs speedup, e.g. 1.8."),
    max_loss_increase: Optional[float] = typer.Option(None, "--max-loss-increase", help="Tolerated loss increase."),
    policy: str = typer.Option("profile", "--policy", help="profile (derived) or paper (fixed formula)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Paper policy: skip-probability scale (default 0.5)."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Paper policy: depth slope (default 0.2)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing schedule file."),
) -> None:
    """Derive schedule.yaml from the tables of an analysis and a budget."""
    with user_errors():
        from sts_profile.analysis import schedule_from_tables
        from sts_profile.derive import Budget

        budget = Budget(target_speedup=target_speedup, max_loss_increase=max_loss_increase,
                        policy=policy, **_paper_params(policy, alpha, eps))
        with warnings_as_lines():
            path = schedule_from_tables(tables_dir, budget, output, overwrite=overwrite)
        typer.echo(f"wrote {path}")


@app.command()
def recipe(
    out: Path = typer.Option(Path("reports/demo"), "--out", help="Report folder (index.html, summary.json, plots)."),
    work: Path = typer.Option(Path("runs/demo"), "--work", help="Working folder: data, runs, analysis."),
    size: str = typer.Option("demo", "--size", help="Factory model size: demo, small or test."),
    alignment_steps: Optional[int] = typer.Option(None, help="Optimizer steps of stage 1 (default 60; 6 with --size test)."),
    instruction_steps: Optional[int] = typer.Option(None, help="Optimizer steps of stage 2 (default 300; 8 with --size test)."),
    target_speedup: Optional[float] = typer.Option(
        None, "--target-speedup", help="Schedule budget: FLOPs speedup (--policy profile; default 2.0)."),
    max_loss_increase: Optional[float] = typer.Option(None, "--max-loss-increase",
                                                      help="Schedule budget: tolerated loss increase instead."),
    policy: str = typer.Option("profile", "--policy", help="profile (derived) or paper (fixed formula)."),
    seed: int = typer.Option(0, "--seed", help="Data, weights and plan seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier recipe in --work/--out."),
) -> None:
    """The whole stage-aware recipe: dense run, analyze, schedule, sparse run, evaluate, compare."""
    with user_errors():
        from dataclasses import replace

        from sts_profile.recipe import RecipeConfig, run_recipe, test_size

        cfg = RecipeConfig(out=str(out), work=str(work), size=size, seed=seed, policy=policy,
                           target_speedup=target_speedup,
                           max_loss_increase=max_loss_increase, overwrite=overwrite)
        if size == "test":
            cfg = test_size(cfg)
        if alignment_steps is not None:
            cfg = replace(cfg, alignment_steps=alignment_steps)
        if instruction_steps is not None:
            cfg = replace(cfg, instruction_steps=instruction_steps)
        run_recipe(cfg)


def run() -> None:
    """Console-script entry point (``[project.scripts]``): usage errors as one line, exit 2."""
    run_app(app)


if __name__ == "__main__":
    run()
