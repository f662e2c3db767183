"""``sts-train``: stage-aware sparse training of LLaVA-style models.

    sts-train make-data data/shapes                # synthetic LLaVA-format data set
    sts-train make-model demo models/demo          # a random-weight model folder
    sts-train train run.yaml                       # train one stage (dense without a schedule)
    sts-train evaluate runs/x/checkpoint-100 --data data/shapes/instruction_eval.json
    sts-train plan schedule.yaml --layers 8 --steps 100   # preview what a schedule does

Heavy imports (torch, transformers) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from sts_train.clitools import run_app, user_errors
from sts_train.errors import StsError

app = typer.Typer(
    help="Stage-aware sparse training (Visual Token Compressor + Layer Dynamic Skipper) "
    "of LLaVA-style models on the Hugging Face Trainer.",
    no_args_is_help=True,
    add_completion=False,
)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise StsError(f"--set {item!r}: expected KEY=VALUE such as training.max_steps=10")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise StsError(f"--set {item!r}: the value is not valid YAML;"
                           f" quote it, e.g. --set '{key}=\"{value}\"'") from None
    return out


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config YAML (model, data, stage, schedule, training, output_dir)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set training.max_steps=10"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Override output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in output_dir."),
) -> None:
    """Train one stage; a schedule adds token compression and layer skipping."""
    with user_errors():
        from sts_train.config import load_run_config

        overrides = _parse_overrides(set_)
        if output_dir is not None:
            overrides["output_dir"] = str(output_dir)
        cfg = load_run_config(config, overrides)
        from sts_train.train import train as run_train

        summary = run_train(cfg, resume=resume, overwrite=overwrite)
        _end_distributed()
        typer.echo(
            f"done: {summary['global_step']} steps in {summary['wall_time_s']:.1f} s, "
            f"FLOPs saved {100 * summary['flops_saved_frac']:.1f}%, "
            f"speedup estimate {summary['speedup_estimate']:.2f}x -> {cfg.output_dir}"
        )


def _end_distributed() -> None:
    """Tear down the process group the HF Trainer opened (torchrun/accelerate) before exit.

    Left to interpreter shutdown, a gloo group's threads can be destroyed while still joinable,
    and a finished run then aborts ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@app.command("make-data")
def make_data(
    out: Path = typer.Argument(..., help="Folder to write (images/, alignment.json, instruction.json, *_eval.json)."),
    n_alignment: int = typer.Option(200, help="Caption samples for stage 1."),
    n_instruction: int = typer.Option(200, help="Question-answer samples for stage 2."),
    n_eval: int = typer.Option(50, help="Held-out samples per split."),
    image_size: int = typer.Option(336, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty folder."),
) -> None:
    """Generate the synthetic "shapes" data set in the LLaVA format."""
    with user_errors():
        from sts_train.shapes import MIN_IMAGE_SIZE_PX, generate_shapes

        for flag, value, least in (("--n-alignment", n_alignment, 0), ("--n-instruction", n_instruction, 0),
                                   ("--n-eval", n_eval, 0), ("--image-size", image_size, MIN_IMAGE_SIZE_PX)):
            if value < least:
                raise StsError(f"{flag} {value}: must be an integer >= {least}")
        paths = generate_shapes(out, n_alignment=n_alignment, n_instruction=n_instruction, n_eval=n_eval,
                                image_size_px=image_size, seed=seed, overwrite=overwrite)
        typer.echo(f"wrote {len(paths)} files under {out}")


@app.command("make-model")
def make_model(
    size: str = typer.Argument(..., help="Factory size: test, small or demo."),
    out: Path = typer.Argument(..., help="Model folder to write (config, safetensors, processor)."),
    seed: int = typer.Option(0, help="Weight initialisation seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty folder."),
) -> None:
    """Write a random-weight LLaVA model folder that loads with AutoModelForImageTextToText."""
    with user_errors():
        from sts_train.factory import save_model_folder

        save_model_folder(size, out, seed=seed, overwrite=overwrite)
        typer.echo(f"wrote {size} model to {out}")


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., help="A model folder or checkpoint-N (loaded with plain transformers)."),
    data: Path = typer.Option(..., "--data", help="LLaVA JSON of the held-out split."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder (default: the JSON's folder)."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Only the loss."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N samples."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the result to this JSON file, with every answer's outcome."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Dense evaluation: held-out loss and exact-match answer accuracy (greedy, every turn)."""
    with user_errors():
        import json

        from sts_train.configtools import atomic_write_text, check_file_target
        from sts_train.evaluate import evaluate_folder

        if limit is not None and limit < 1:
            raise StsError(f"--limit {limit}: must be >= 1; omit it to evaluate every sample")
        if json_out is not None:  # before the evaluation, not after it
            check_file_target(json_out, example="eval.json", overwrite=overwrite)
        result = evaluate_folder(model_dir, data, images, accuracy=not no_accuracy, limit=limit, device=device)
        if json_out is not None:
            atomic_write_text(json_out, json.dumps(result, indent=2) + "\n", overwrite=overwrite)
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "outcomes"}, indent=2))


@app.command()
def plan(
    schedule: Path = typer.Argument(..., help="schedule.yaml"),
    layers: int = typer.Option(..., "--layers", help="Number of decoder layers of the model."),
    steps: int = typer.Option(..., "--steps", help="Total optimizer steps (for stages without step ranges)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Stage to preview (default: by step ranges; a run "
                                        "trains the stage named like its stage.name)."),
    every: int = typer.Option(0, help="Print every N-th step (default: about 10 rows)."),
) -> None:
    """Validate a schedule and print its plan over the run: keep ratio and skip probabilities."""
    with user_errors():
        from sts_train.schedule import load_schedule

        if layers < 1:
            raise StsError(f"--layers {layers}: must be >= 1 (the model's decoder layers)")
        if steps < 1:
            raise StsError(f"--steps {steps}: must be >= 1 (the run's total optimizer steps)")
        if every < 0:
            raise StsError(f"--every {every}: must be >= 1, or 0 for about ten rows")
        sched = load_schedule(schedule)
        sched.check_model(layers)
        every = every or max(1, steps // 10)
        plans = [(step, sched.plan(step, num_layers=layers, stage=stage, total_steps=steps))
                 for step in sorted(set(range(0, steps, every)) | {steps - 1})]  # all checked before printing
        typer.echo("step  stage         method       keep   skip_prob per layer")
        for step, p in plans:
            probs = " ".join(f"{x:.2f}" for x in p.skip_prob)
            typer.echo(f"{step:<5d} {str(p.stage):<13s} {str(p.method):<12s} {p.keep_ratio:<6.3f} {probs}")


def run() -> None:
    """Console-script entry point (``[project.scripts]``): usage errors as one line, exit 2."""
    run_app(app)


if __name__ == "__main__":
    run()
