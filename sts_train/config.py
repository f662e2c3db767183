"""The ``sts-train`` run config: one frozen dataclass per concern, mapped from YAML key by key.

Example (``sts-train train run.yaml``)::

    model: {size: demo}                 # or {path: /models/my-llava}
    data: {json: data/shapes/alignment.json, images: data/shapes,   # image paths are relative to it
           eval_json: data/shapes/alignment_eval.json}
    stage: {name: alignment}            # alignment: projector only; instruction: + LLM
    schedule: {path: schedule.yaml, stage: alignment}   # optional; none = dense baseline
    training: {max_steps: 200, per_device_train_batch_size: 4, learning_rate: 1.0e-3}
    output_dir: runs/align
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sts_train.configtools import from_mapping, read_yaml
from sts_train.errors import StsError

STAGES = ("alignment", "instruction")


@dataclass(frozen=True)
class ModelConfig:
    """A local model folder (``path``) or a factory size (``size``: test, small, demo)."""

    path: str | None = None
    size: str | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.path is None) == (self.size is None):
            raise StsError("model: give exactly one of path (a model folder) or size (test, small, demo)")


@dataclass(frozen=True)
class DataConfig:
    """LLaVA JSON + image folder for training, and an optional held-out split."""

    json: str
    images: str | None = None
    eval_json: str | None = None
    eval_images: str | None = None  # default: ``images``
    max_length: int | None = None
    # Open every image's header before training (a broken file is found before step 0, not
    # mid-run); about a minute per few hundred thousand local files: turn off for huge sets.
    check_images: bool = True


@dataclass(frozen=True)
class StageConfig:
    """Which parts train. ``train_llm`` defaults to the stage: False in alignment, True in
    instruction. The vision tower is frozen unless ``train_vision``."""

    name: str = "instruction"
    train_projector: bool = True
    train_llm: bool | None = None
    train_vision: bool = False

    def __post_init__(self):
        if self.name not in STAGES:
            raise StsError(f"stage.name = {self.name!r} is unknown; use one of {', '.join(STAGES)}")

    @property
    def llm_trainable(self) -> bool:
        return self.name == "instruction" if self.train_llm is None else self.train_llm


@dataclass(frozen=True)
class ScheduleConfig:
    """The schedule file and which of its stages this run trains (default: the stage named
    like ``stage.name``; by step ranges, or the only stage, when the schedule has none of the
    training stages' names).

    A named stage with a step range starts at this run's step 0: a run trains one stage from
    its start, and the range sets the stage's length (its progress runs over ``end - start``).
    """

    path: str | None = None
    stage: str | None = None
    # Evaluation runs dense unless asked; when asked, it runs the plan of the last training
    # step before it (its keep ratio and its one draw of skipped layers), not a fresh draw.
    eval_sparse: bool = False

    def __post_init__(self):
        if self.path is None and (self.stage is not None or self.eval_sparse):
            given = "schedule.stage" if self.stage is not None else "schedule.eval_sparse"
            raise StsError(f"{given} is set but schedule.path is not; add schedule.path or drop {given}")


@dataclass(frozen=True)
class TrainingConfig:
    """The usual training arguments, passed to ``transformers.TrainingArguments``."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int | None = None
    eval_steps: int | None = None
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = False
    dataloader_num_workers: int = 0
    report_to: tuple[str, ...] = ("tensorboard",)

    def __post_init__(self):
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise StsError("training: set max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise StsError(f"training.{name} = {getattr(self, name)} must be a positive integer")
        for name in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise StsError(f"training.{name} = {getattr(self, name)} is negative; use a value >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise StsError(f"training.save_total_limit = {self.save_total_limit} is negative; use null or 0 to"
                           " keep every checkpoint, or a positive count")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise StsError(f"training.eval_steps = {self.eval_steps} must be a positive integer or null")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    output_dir: str
    model: ModelConfig = field(default_factory=lambda: ModelConfig(size="test"))
    stage: StageConfig = field(default_factory=StageConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a run config YAML (plus dotted ``overrides`` such as ``{"training.max_steps": 5}``).

    Raises:
        StsError: missing file, broken YAML, unknown keys, bad values (message names the key).
    """
    data = read_yaml(path, "run config file") or {}
    if not isinstance(data, dict):
        raise StsError(f"{path}: a run config must be a mapping; see `sts-train train --help`")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:  # absent, or a section whose keys are all commented out
                node[key] = {}
            elif not isinstance(node[key], dict):
                raise StsError(f"--set {dotted}: {key} is {node[key]!r}, not a section; fix the key")
            node = node[key]
        node[leaf] = value
    try:
        return from_mapping(RunConfig, data, "config")
    except StsError as exc:
        raise StsError(f"{path}: {exc}") from None


def with_output_dir(config: RunConfig, output_dir: str | Path) -> RunConfig:
    return replace(config, output_dir=str(output_dir))
