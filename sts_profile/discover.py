"""Find the checkpoints of a training run, in order, tagged with their step and stage.

Layouts understood (``sts-profile analyze PATH``)::

    PATH/checkpoint-10/ checkpoint-20/ ...        an HF Trainer output_dir (sorted by N as a number)
    PATH/modelA/ modelB/ ...                      a folder of model folders (each has config.json)
    PATH/alignment/checkpoint-N/ PATH/instruction/checkpoint-N/
                                                  a run with one sub-run per stage
    PATH/config.json                              a single model folder

The step of a checkpoint is ``global_step`` from its ``trainer_state.json`` (plain JSON), else
the trailing number of its folder name, else its position in name order. Its stage is the
``stage.name`` of the ``sts_run.yaml`` that ``sts-train`` writes into a run folder, else the
name of the stage sub-folder it sits in, else ``"unknown"``. A final model that a Trainer
saves into a run folder itself (next to ``checkpoint-N/``, in ``PATH`` or in a stage
sub-folder) is not analyzed separately: it repeats the last checkpoint. A single
``checkpoint-N`` folder belongs to the run above it when that run has an ``sts_run.yaml``.

Stage runs are put in the order they were trained (each usually counts its steps from 0
again): a run whose ``sts_run.yaml`` ``model.path`` is another run's checkpoint follows that
run; otherwise ``alignment``/``pretrain`` come before ``instruction``/``finetune`` (LLaVA's own
scripts use the latter names), and other names follow by when their first checkpoint was
written, then by name.

Nothing from a checkpoint is executed or unpickled here: only ``config.json``,
``trainer_state.json`` and ``sts_run.yaml`` are read, as JSON/YAML text.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from sts_train.errors import ModelError

RUN_CONFIG_FILE = "sts_run.yaml"  # written by sts_train.train into a run's output_dir
# Stage names whose order is known (LLaVA's own scripts call the two stages pretrain and
# finetune); stage runs with other names follow them, in the order they were trained.
STAGE_RANK = {"alignment": 0, "pretrain": 0, "instruction": 1, "finetune": 1}


def stage_rank(name: str) -> int:
    """Where a stage named ``name`` goes among others: :data:`STAGE_RANK`, other names after."""
    return STAGE_RANK.get(name, max(STAGE_RANK.values()) + 1)

# Config keys whose values must agree for two checkpoints to be "the same architecture".
_SHAPE_KEYS = {
    "text_config": ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"),
    "vision_config": ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "image_size", "patch_size"),
}


class TrendWarning(UserWarning):
    """Emitted when a run has a single checkpoint: per-checkpoint values, but no trends."""


class StageOrderWarning(UserWarning):
    """Emitted when the order of two stage runs rests on when their checkpoints were written."""


@dataclass(frozen=True)
class Checkpoint:
    """One model folder of a run.

    Attributes:
        path: the model folder (holds ``config.json`` and the weights).
        name: unique label inside the analyzed folder, e.g. ``alignment/checkpoint-20``.
        step: optimizer step of the checkpoint.
        stage: training stage tag (``alignment``, ``instruction``, ... or ``unknown``).
        run: the run folder the checkpoint belongs to.
    """

    path: Path
    name: str
    step: int
    stage: str
    run: Path


def is_model_folder(path: Path) -> bool:
    """True when ``path`` is a folder with a ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def _children(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _trailing_number(name: str) -> int | None:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None


def _global_step(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def run_config(run: Path) -> dict:
    """A run folder's ``sts_run.yaml`` as a dict (empty when absent or unreadable)."""
    config = run / RUN_CONFIG_FILE
    if not config.is_file():
        return {}
    try:
        data = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _section_value(run: Path, section: str, key: str) -> str | None:
    value = run_config(run).get(section)
    value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def run_stage(run: Path) -> str | None:
    """``stage.name`` from a run folder's ``sts_run.yaml`` (None when absent or unreadable)."""
    return _section_value(run, "stage", "name")


def _run_checkpoints(run: Path, root: Path, stage: str) -> list[Checkpoint]:
    """The model folders directly inside ``run``, ordered by step."""
    models = [p for p in _children(run) if is_model_folder(p)]
    found = []
    for index, folder in enumerate(sorted(models, key=lambda p: (_trailing_number(p.name) is None,
                                                                 _trailing_number(p.name) or 0, p.name))):
        step = _global_step(folder)
        if step is None:
            step = _trailing_number(folder.name)
        if step is None:
            step = index
        found.append(Checkpoint(path=folder, name=folder.relative_to(root).as_posix(), step=step,
                                stage=stage, run=run))
    return sorted(found, key=lambda c: (c.step, c.name))


def _started_from(run: Path, runs: list[Path]) -> Path | None:
    """The run among ``runs`` whose checkpoint ``run`` was started from, if any.

    ``model.path`` of the run's ``sts_run.yaml`` is as training was given it: absolute, or
    relative to where training ran (tried from here and from the folder above the run). Failing
    those, a path ending in ``<run folder>/<checkpoint>`` (or ``<run folder>``) names that run.
    """
    given = _section_value(run, "model", "path")
    if given is None:
        return None
    others = [other for other in runs if other != run]
    for start in (Path(given), run.parent / given):
        try:
            start = start.resolve()
        except (OSError, RuntimeError):
            continue
        holding = [other for other in [run, *others] if other.resolve() in (start, *start.parents)]
        if holding:  # the innermost: checkpoints saved directly in PATH make PATH a run too
            inner = max(holding, key=lambda other: len(other.resolve().parts))
            return None if inner == run else inner  # its own checkpoint (a restart): no other run's
    parts = Path(given).parts
    named = [other for other in others if parts and (parts[-1] == other.name or (
        len(parts) >= 2 and parts[-2] == other.name and is_model_folder(other / parts[-1])))]
    return named[0] if len(named) == 1 else None


def _training_order(checkpoints: list[Checkpoint]) -> list[Path]:
    """The runs of ``checkpoints`` in the order they were trained.

    A run whose ``sts_run.yaml`` says it started from another run's checkpoint comes after that
    run. Otherwise known stage names come first in their order (:data:`STAGE_RANK`), then the
    others by when their first checkpoint was written (folder modification time; a copy that
    does not keep times loses this), then by name.

    Warns:
        StageOrderWarning: the order of some runs rests on those times alone.
    """
    runs: dict[Path, list[Checkpoint]] = {}
    for ckpt in checkpoints:
        runs.setdefault(ckpt.run, []).append(ckpt)

    def written(run: Path) -> float:
        return min(c.path.stat().st_mtime for c in runs[run])

    def key(run: Path) -> tuple:
        stage = runs[run][0].stage
        return stage_rank(stage), written(run), stage, str(run)

    pending = sorted(runs, key=key)
    after = {run: _started_from(run, pending) for run in pending}
    order: list[Path] = []
    while pending:  # a stable topological sort; a cycle (not a real training history) keeps key order
        ready = next((r for r in pending if after[r] is None or after[r] in order), pending[0])
        order.append(ready)
        pending.remove(ready)

    def lineage(run: Path) -> list[Path]:  # the run, then the runs it started from, directly or not
        chain = [run]
        while after[chain[-1]] is not None and after[chain[-1]] not in chain:
            chain.append(after[chain[-1]])
        return chain

    def rank(run: Path) -> int:
        return stage_rank(runs[run][0].stage)

    def below_common(a: Path, b: Path) -> tuple[Path, Path]:
        """The two runs whose order by time put a and b in theirs: on the lines of runs each
        started from (of a's and b's stage rank; earlier ranks are ordered by name), the runs
        just below where the lines meet, or the lines' first runs."""
        line_a, line_b = (list(itertools.takewhile(lambda r: rank(r) == rank(a), lineage(x))) for x in (a, b))
        common = next((r for r in line_a if r in line_b), None)
        pick = (lambda line: line[-1]) if common is None else (lambda line: line[line.index(common) - 1])
        return pick(line_a), pick(line_b)

    by_time = {run for i, a in enumerate(order) for b in order[i + 1:]
               if rank(a) == rank(b) and a not in lineage(b) and b not in lineage(a) for run in below_common(a, b)}
    if by_time:
        named = ", then ".join(r.name for r in order if r in by_time)
        warnings.warn(f"stage runs ordered by when their checkpoints were written: {named}; neither their stage "
                      "names (alignment/pretrain before instruction/finetune) nor an sts_run.yaml model.path says "
                      "which came first: check that order, or rename the stage folders", StageOrderWarning,
                      stacklevel=3)
    return order


def architecture(folder: Path) -> dict:
    """The shape facts of a model folder's ``config.json`` that must agree across a run."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{folder / 'config.json'}: not valid JSON; re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'}: not a JSON object; re-save the model with save_pretrained")
    facts = {"model_type": config.get("model_type")}
    for section, keys in _SHAPE_KEYS.items():
        sub = config.get(section) or {}
        for key in keys:
            facts[f"{section}.{key}"] = sub.get(key) if isinstance(sub, dict) else None
    return facts


def check_same_architecture(checkpoints: list[Checkpoint], root: Path) -> None:
    """Raise when two checkpoints have different model shapes.

    Raises:
        ModelError: naming the first differing key and both folders.
    """
    first = checkpoints[0]
    reference = architecture(first.path)
    for ckpt in checkpoints[1:]:
        facts = architecture(ckpt.path)
        for key, value in reference.items():
            if facts[key] != value:
                raise ModelError(
                    f"{root}: checkpoints have different architectures ({first.name} has {key}={value}, "
                    f"{ckpt.name} has {key}={facts[key]}); analyze each architecture's run separately"
                )


def _monotonic_steps(found: list[Checkpoint]) -> list[Checkpoint]:
    """Make steps increase across runs: a run that counted again from 0 (a new Trainer
    started from the previous run's final checkpoint, usually the next stage) is shifted by the
    last step of the runs before it, so plots over ``step`` show the runs one after the other.
    Progress within a stage (what schedules use) is unchanged by the shift."""
    out, offset, last, current = [], 0, None, None
    for ckpt in found:
        if ckpt.run != current:
            if last is not None and ckpt.step + offset <= last:
                offset = last
            current = ckpt.run
        shifted = replace(ckpt, step=ckpt.step + offset)
        last = shifted.step
        out.append(shifted)
    return out


def discover_checkpoints(path: str | Path) -> list[Checkpoint]:
    """All checkpoints under ``path``, in training order (run, then step).

    Args:
        path: a run folder, a folder of model folders, a run with stage sub-folders, or one
            model folder (see the module docstring).

    Returns:
        The checkpoints in training order: by stage run (:func:`_training_order`), then by step.

    Raises:
        ModelError: ``path`` is not a run or model folder (no ``config.json`` in it, its
            sub-folders or their sub-folders), or its checkpoints have different architectures.

    Warns:
        TrendWarning: only one checkpoint was found (trends need two or more).
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"{root}: not a run or model folder (no such directory); pass a Trainer "
                         "output_dir with checkpoint-N/ folders or a model folder")
    if is_model_folder(root) and not any(is_model_folder(p) for p in _children(root)):
        own = run_stage(root)
        stage = own or run_stage(root.parent) or "unknown"
        step = _global_step(root)
        step = step if step is not None else (_trailing_number(root.name) or 0)
        # a checkpoint-N of a run: the run's sts_run.yaml (stage, calibration data) is its parent's
        run = root.parent if own is None and (root.parent / RUN_CONFIG_FILE).is_file() else root
        found = [Checkpoint(path=root, name=root.name, step=step, stage=stage, run=run)]
    else:
        # a sub-folder holding model folders is a stage's run, even when a Trainer also saved
        # its final model into it (that model repeats its last checkpoint and is skipped)
        stage_runs = [p for p in _children(root) if any(is_model_folder(c) for c in _children(p))]
        found = [c for c in _run_checkpoints(root, root, run_stage(root) or "unknown")
                 if c.path not in stage_runs]
        staged = []
        for run in stage_runs:
            staged += _run_checkpoints(run, root, run_stage(run) or run.name)
        found += staged
        rank = {run: i for i, run in enumerate(_training_order(found))}
        found = _monotonic_steps(sorted(found, key=lambda c: (rank[c.run], c.step, c.name)))
    if not found:
        raise ModelError(f"{root}: not a run or model folder (no config.json in it or its sub-folders); "
                         "pass a Trainer output_dir with checkpoint-N/ folders or a model folder")
    check_same_architecture(found, root)
    if len(found) == 1:
        warnings.warn(f"{root}: only one checkpoint ({found[0].name}); it is analyzed, but trends "
                      "across training need two or more checkpoints", TrendWarning, stacklevel=2)
    return found


def check_weights(folder: Path) -> None:
    """Check that a checkpoint's weight files are complete, without loading (or unpickling) them.

    Every ``*.safetensors`` header is parsed, which also detects a truncated file (the header
    then describes more bytes than the file holds). ``*.bin`` files are not opened here: they
    are read later with ``torch.load(weights_only=True)`` inside transformers.

    Raises:
        ModelError: no weight file, or a safetensors file that is truncated or corrupt.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder}: no weight file (model.safetensors); the checkpoint is incomplete, "
                         "re-save it or remove it from the run")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise ModelError(f"{file}: weight file is truncated or corrupt ({reason}); re-save the "
                             "checkpoint or remove it from the run") from None


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def processor_folder(checkpoints: list[Checkpoint], root: Path) -> Path:
    """The folder to load the processor (tokenizer + image processor) from.

    The first checkpoint that holds a tokenizer, else its run folder, else ``root``.

    Raises:
        ModelError: no tokenizer anywhere in the run.
    """
    for ckpt in checkpoints:
        if has_tokenizer(ckpt.path):
            return ckpt.path
    for folder in [*dict.fromkeys(c.run for c in checkpoints), root]:
        if has_tokenizer(folder):
            return folder
    first = checkpoints[0].path
    raise ModelError(f"{first}: no tokenizer in the checkpoint or its run folder; save the processor "
                     "there with processor.save_pretrained(folder) (or pass processing_class to the Trainer)")
