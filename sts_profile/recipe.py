"""The stage-aware recipe end to end: dense run -> profile -> schedule -> sparse run -> compare.

    sts-profile recipe --out reports/demo            # the README's main command runs this

1. generate the shapes data set (LLaVA JSON + PNGs);
2. train the model densely: alignment (projector only), then instruction tuning (projector +
   LLM) from the alignment run's final checkpoint, saving checkpoints at regular steps;
3. ``analyze`` the dense run (both stages) and derive ``schedule.yaml`` within the budget;
4. train again from the same initial weights with the schedule (each stage with the token
   compression and layer skipping its schedule stage sets);
5. evaluate both final models densely on the held-out splits (loss, answer accuracy);
6. write the comparison report (``index.html``, ``summary.json``, ``schedule.yaml``, plots) under ``--out``.

Every phase prints its wall time as it ends; training shows the HF progress bar.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sts_train.clitools import echo
from sts_train.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig, StageConfig, TrainingConfig
from sts_train.errors import StsError

STAGE_ORDER = ("alignment", "instruction")
DEFAULT_TARGET_SPEEDUP = 2.0  # the profile policy's budget when none is given
WORK_ENTRIES = frozenset({"data", "dense", "analysis", "sparse"})  # what run_recipe writes in --work


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes and budgets of one recipe run (defaults: the README demo, ~15 min on 2 cores)."""

    out: str = "reports/demo"
    work: str = "runs/demo"
    size: str = "demo"
    seed: int = 0
    n_alignment: int = 400
    n_instruction: int = 1200
    n_eval: int = 300
    alignment_steps: int = 60
    instruction_steps: int = 300
    batch_size: int = 4
    lr_alignment: float = 2e-3
    lr_instruction: float = 5e-4  # dense demo, seed 0: 2.5e-4 41%, 5e-4 55%, 1e-3 46%, 2e-3 22%, 3e-3 17%
    checkpoints_per_stage: int = 3
    profile_samples: int = 8
    target_speedup: float | None = None  # policy profile without max_loss_increase: 2.0
    max_loss_increase: float | None = None
    policy: str = "profile"
    eval_limit: int | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.policy == "profile" and self.target_speedup is None and self.max_loss_increase is None:
            object.__setattr__(self, "target_speedup", DEFAULT_TARGET_SPEEDUP)


class Phases:
    """Times phases and prints ``[recipe] name: N.N s`` as each ends."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        echo(f"[recipe] {name} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t0
        echo(f"[recipe] {name}: {self.times[name]:.1f} s (total {time.perf_counter() - self.start:.0f} s)")
        return result


def _stage_run(cfg: RecipeConfig, data: dict, stage: str, out: Path, model: ModelConfig,
               schedule: Path | None) -> RunConfig:
    steps = cfg.alignment_steps if stage == "alignment" else cfg.instruction_steps
    save_every = max(1, steps // cfg.checkpoints_per_stage)
    return RunConfig(
        model=model,
        # no eval_json: the held-out splits are evaluated once, after both stages (evaluate_run)
        data=DataConfig(json=str(data[stage]), images=str(data["images"].parent)),
        stage=StageConfig(name=stage),
        schedule=ScheduleConfig(path=str(schedule) if schedule else None, stage=stage if schedule else None),
        training=TrainingConfig(
            max_steps=steps, per_device_train_batch_size=cfg.batch_size, save_steps=save_every,
            logging_steps=max(1, steps // 10),
            learning_rate=cfg.lr_alignment if stage == "alignment" else cfg.lr_instruction,
            warmup_steps=max(1, steps // 20), seed=cfg.seed,
        ),
        output_dir=str(out / stage),
    )


def train_two_stages(cfg: RecipeConfig, data: dict, out: Path, phases: Phases, label: str,
                     schedule: Path | None = None) -> dict:
    """Alignment from the factory model, then instruction tuning from its final checkpoint."""
    from sts_train.train import train

    summaries = {}
    model = ModelConfig(size=cfg.size, seed=cfg.seed)
    for stage in STAGE_ORDER:
        run = _stage_run(cfg, data, stage, out, model, schedule)
        summaries[stage] = phases.run(f"{label} {stage}", train, run, overwrite=cfg.overwrite)
        model = ModelConfig(path=str(final_checkpoint(Path(run.output_dir))))
    return summaries


def recipe_data(cfg: RecipeConfig, folder: Path) -> dict:
    """Write the shapes data set the recipe trains and evaluates on (``cfg``'s counts, its
    size's image side and its seed) into ``folder``; returns its paths."""
    from sts_train.factory import get_size
    from sts_train.shapes import generate_shapes

    return generate_shapes(folder, n_alignment=cfg.n_alignment, n_instruction=cfg.n_instruction,
                           n_eval=cfg.n_eval, image_size_px=get_size(cfg.size).image_size_px, seed=cfg.seed)


def final_checkpoint(run_dir: Path) -> Path:
    from sts_train.modelio import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise StsError(f"{run_dir}: no checkpoint-N was written; check save_steps")
    return latest


def evaluate_run(run_dir: Path, data: dict, limit: int | None) -> dict:
    from sts_train.evaluate import evaluate_split
    from sts_train.modelio import load_model, load_processor

    final = final_checkpoint(run_dir / "instruction")
    model, processor = load_model(final), load_processor(final)
    qa = evaluate_split(model, processor, data["instruction_eval"], data["images"].parent, limit=limit)
    captions = evaluate_split(model, processor, data["alignment_eval"], data["images"].parent, accuracy=False,
                              limit=limit)
    return {"checkpoint": str(final), "eval_loss_qa": qa["eval_loss"], "answer_accuracy": qa["answer_accuracy"],
            "answered": qa["answered"], "per_kind": qa["per_kind"], "eval_loss_captions": captions["eval_loss"],
            "outcomes": qa["outcomes"]}


def prior_baseline(data: dict) -> dict:
    """Accuracy of answering each question kind's most common training answer (no model)."""
    from sts_train.data import load_llava_json
    from sts_train.evaluate import prior_accuracy

    return prior_accuracy(load_llava_json(data["instruction"]), load_llava_json(data["instruction_eval"]))


def compare(dense: dict, sparse: dict, dense_eval: dict, sparse_eval: dict, prior: dict | None = None) -> dict:
    """Side-by-side numbers of the two runs (wall time per stage, FLOPs, quality).

    ``prior`` (:func:`prior_baseline`) is what a guesser that ignores the image scores. The
    evaluations' per-answer ``outcomes`` (:func:`evaluate_run`) become ``accuracy_difference``,
    sparse minus dense paired by answer, and are not kept."""
    from sts_train.evaluate import paired_difference

    dense_eval, sparse_eval = dict(dense_eval), dict(sparse_eval)
    difference = paired_difference(dense_eval.pop("outcomes", []), sparse_eval.pop("outcomes", []))
    rows = {}
    for stage in STAGE_ORDER:
        d, s = dense[stage], sparse[stage]
        rows[stage] = {
            "dense_wall_s": d["wall_time_s"], "sparse_wall_s": s["wall_time_s"],
            "speedup": d["wall_time_s"] / s["wall_time_s"],
            "flops_saved_frac": 1 - s["flops"] / d["flops"],
            "visual_tokens_saved_frac": s["visual_tokens_saved_frac"],
            "layer_skips": s["layer_skips"],
        }
    dense_total = sum(dense[s]["wall_time_s"] for s in STAGE_ORDER)
    sparse_total = sum(sparse[s]["wall_time_s"] for s in STAGE_ORDER)
    return {
        "stages": rows,
        "end_to_end": {
            "dense_wall_s": dense_total, "sparse_wall_s": sparse_total, "speedup": dense_total / sparse_total,
            "flops_saved_frac": 1 - sum(sparse[s]["flops"] for s in STAGE_ORDER)
            / sum(dense[s]["flops"] for s in STAGE_ORDER),
        },
        "quality": {"dense": dense_eval, "sparse": sparse_eval, **({"prior": prior} if prior else {}),
                    "accuracy_difference": difference},
    }


def check_recipe(cfg: RecipeConfig) -> None:
    """Check the size, counts, budget and folders before anything is written or deleted.

    Raises:
        StsError: one line naming the option and the fix.
    """
    from sts_profile.compare_report import REPORT_ENTRIES
    from sts_profile.derive import Budget
    from sts_train.configtools import check_overwritable, check_replaceable, json_field
    from sts_train.factory import get_size
    from sts_train.shapes import is_shapes_dataset

    get_size(cfg.size)
    counts = ("alignment_steps", "instruction_steps", "n_alignment", "n_instruction", "n_eval", "batch_size",
              "checkpoints_per_stage", "profile_samples", "eval_limit")
    for key in counts:
        value = getattr(cfg, key)
        if key == "eval_limit" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            name = f"--{key.replace('_', '-')}" if key.endswith("_steps") else f"RecipeConfig.{key}"
            raise StsError(f"{name} = {value!r} must be an integer >= 1; pass a positive count")
    for key in ("lr_alignment", "lr_instruction"):
        if not getattr(cfg, key) > 0:
            raise StsError(f"RecipeConfig.{key} = {getattr(cfg, key)!r} must be a positive learning rate")
    Budget(target_speedup=cfg.target_speedup, max_loss_increase=cfg.max_loss_increase, policy=cfg.policy)
    work, out = (check_replaceable(folder) for folder in (cfg.work, cfg.out))
    if work == out or work in out.parents or out in work.parents:
        raise StsError(f"--work {cfg.work} and --out {cfg.out} overlap (writing the report replaces --out);"
                       " choose two separate folders")
    owned = {work: is_shapes_dataset(work / "data"),  # the recipe writes its data set first
             out: json_field(out / "summary.json", "end_to_end") is not None}
    written = {work: WORK_ENTRIES, out: REPORT_ENTRIES}
    for folder, option, what in ((work, "--work", "recipe run"), (out, "--out", "recipe report")):
        if folder.is_dir() and any(folder.iterdir()):
            if not cfg.overwrite:
                raise StsError(f"{option} {folder}: folder is not empty; choose another folder or pass --overwrite")
            check_overwritable(folder, owned[folder], what)
            other = sorted(p.name for p in folder.iterdir() if p.name not in written[folder])
            if other:
                raise StsError(f"{option} {folder}: --overwrite would also delete {other[0]}, which the recipe did"
                               " not write; move it out or choose another folder")


def run_recipe(cfg: RecipeConfig) -> dict:
    """Run the whole recipe; returns the comparison and writes the report under ``cfg.out``.

    Raises:
        StsError: a bad size, count or budget (:func:`check_recipe`), or the work or report
            folder holds a previous recipe (pass ``overwrite``).
    """
    from sts_profile.analysis import AnalyzeConfig, run_analysis
    from sts_profile.compare_report import write_comparison

    check_recipe(cfg)
    work, out = Path(cfg.work), Path(cfg.out)
    if cfg.overwrite and work.exists():  # --out is replaced only when the new report is written
        try:
            shutil.rmtree(work)
        except OSError as exc:
            raise StsError(f"{work}: cannot remove the earlier run ({exc.strerror or exc}); remove it by hand") from None
    phases = Phases()
    data = phases.run("data", recipe_data, cfg, work / "data")
    dense = train_two_stages(cfg, data, work / "dense", phases, "dense")
    analysis = phases.run("analyze", run_analysis, AnalyzeConfig(
        ckpt_dir=str(work / "dense"), out_dir=str(work / "analysis"),
        data_json=str(data["instruction_eval"]), images=str(data["images"].parent),
        num_samples=cfg.profile_samples, batch_size=4, seed=cfg.seed,
        target_speedup=cfg.target_speedup, max_loss_increase=cfg.max_loss_increase, policy=cfg.policy,
    ))
    schedule = Path(analysis.out_dir) / "schedule.yaml"
    sparse = train_two_stages(cfg, data, work / "sparse", phases, "sparse", schedule=schedule)
    dense_eval = phases.run("evaluate dense", evaluate_run, work / "dense", data, cfg.eval_limit)
    sparse_eval = phases.run("evaluate sparse", evaluate_run, work / "sparse", data, cfg.eval_limit)
    result = compare(dense, sparse, dense_eval, sparse_eval, prior_baseline(data))
    result["phases_s"] = dict(phases.times)
    result["config"] = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    report = phases.run("report", write_comparison, out, result, analysis_dir=Path(analysis.out_dir),
                        schedule=schedule)
    e2e = result["end_to_end"]
    echo(f"[recipe] end to end: dense {e2e['dense_wall_s']:.0f} s, sparse {e2e['sparse_wall_s']:.0f} s, "
         f"speedup {e2e['speedup']:.2f}x; accuracy dense {dense_eval['answer_accuracy']:.3f} "
         f"vs sparse {sparse_eval['answer_accuracy']:.3f} (answer prior "
         f"{result['quality']['prior']['answer_accuracy']:.3f}) -> {report}")
    return result


def test_size(cfg: RecipeConfig) -> RecipeConfig:
    """The same pipeline at the ``test`` size (seconds, for the test suite)."""
    return replace(cfg, size="test", n_alignment=16, n_instruction=24, n_eval=8, alignment_steps=6,
                   instruction_steps=8, batch_size=4, checkpoints_per_stage=2, profile_samples=4)


__all__ = ["RecipeConfig", "check_recipe", "run_recipe", "recipe_data", "train_two_stages", "evaluate_run", "compare",
           "prior_baseline", "test_size"]
