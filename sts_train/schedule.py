"""The schedule contract: which tokens and layers to drop, stage by stage.

The profiler writes a ``schedule.yaml``; the trainer reads it and asks for a plan each step::

    sched = load_schedule("runs/profile/schedule.yaml")
    sched.check_model(num_layers=32)
    plan = sched.plan(step, num_layers=32)                  # stages with step ranges
    plan = sched.plan(step, num_layers=32, stage="instruction", total_steps=1000)
    skipped = sample_skipped_layers(plan.skip_prob, seed=0, step=step)

Everything here is pure (same inputs, same plan on every rank) and imports no torch.
Validation lives in ``__post_init__``; ``from_dict`` only adds key checks, defaults and the
key path (``schedule.stages[1].tokens.keep_ratio``) to the messages.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from sts_train import schedule_fields as fields
from sts_train.configtools import atomic_write_text, check_file_target, read_yaml
from sts_train.errors import ScheduleError

SCHEMA_VERSION = 1
TOKEN_METHODS = ("uniform", "random", "text_guided", "merge")
LAYER_POLICIES = ("paper", "per_layer")

# Factor in [0, 1] at training progress x in [0, 1]; 1 at the start of a stage.
DECAY_CURVES: dict[str, Callable[[float], float]] = {
    "constant": lambda x: 1.0,
    "linear": lambda x: 1.0 - x,
    "quadratic": lambda x: (1.0 - x) ** 2,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
}


def _schema_version(owner: str, value: Any) -> int:
    version = fields.integer(owner, "schema_version", value, minimum=1)
    if version > SCHEMA_VERSION:
        raise fields.FieldError(owner, "schema_version", (
            f"= {version} is newer than this sts version supports ({SCHEMA_VERSION}); upgrade sts"))
    return version


@dataclass(frozen=True)
class StepRange:
    """Global optimizer steps ``[start, end)`` that a stage covers."""

    start: int
    end: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", fields.integer("StepRange", "start", self.start, minimum=0))
        object.__setattr__(self, "end", fields.integer("StepRange", "end", self.end))
        if self.end <= self.start:
            problem = f"= {self.end} is not after start = {self.start}; make end > start"
            raise fields.FieldError("StepRange", "end", problem)

    @classmethod
    def from_dict(cls, d: Any, where: str = "steps") -> StepRange:
        d = fields.mapping(d, where, ("start", "end"), required=("start", "end"))
        return fields.build(where, cls, **d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenSparsity:
    """Keep ``keep_ratio`` of the visual tokens, moving to ``keep_ratio_end`` along ``curve``.

    ``keep_ratio_end`` defaults to ``keep_ratio``; ``curve`` defaults to ``constant``.
    """

    method: str
    keep_ratio: float
    keep_ratio_end: float | None = None
    curve: str = "constant"

    def __post_init__(self) -> None:
        owner = "TokenSparsity"
        fields.choice(owner, "method", self.method, TOKEN_METHODS)
        ratio = fields.number(owner, "keep_ratio", self.keep_ratio, 0.0, 1.0, "(0, 1]")
        end = ratio if self.keep_ratio_end is None else self.keep_ratio_end
        end = fields.number(owner, "keep_ratio_end", end, 0.0, 1.0, "(0, 1]")
        fields.choice(owner, "curve", self.curve, DECAY_CURVES)
        object.__setattr__(self, "keep_ratio", ratio)
        object.__setattr__(self, "keep_ratio_end", end)

    def keep_ratio_at(self, progress: float) -> float:
        """Keep ratio at progress x in [0, 1]: ``end + (start - end) * DECAY_CURVES[curve](x)``."""
        factor = DECAY_CURVES[self.curve](progress)
        return self.keep_ratio_end + (self.keep_ratio - self.keep_ratio_end) * factor

    @classmethod
    def from_dict(cls, d: Any, where: str = "tokens") -> TokenSparsity:
        allowed = ("method", "keep_ratio", "keep_ratio_end", "curve")
        d = fields.mapping(d, where, allowed, required=("method", "keep_ratio"))
        return fields.build(where, cls, **d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerSparsity:
    """Skip whole decoder layers at random, with a per-layer probability that decays.

    ``paper`` (arXiv 2509.18150), ``L`` layers, layer ``l``, progress ``x``::

        p_l = alpha * (1 - x)**2 * (1 + eps * (2l - (L-1)) / (L-1))     # bracket = 1 if L == 1

    ``per_layer``: ``p_l = skip_prob[l] * DECAY_CURVES[decay](x)``. Layers in ``never_skip``
    (negative indices count from the end) get ``p = 0``. ``decay`` defaults to ``linear`` for
    ``per_layer`` and is always ``quadratic`` for ``paper`` (that is the paper's formula).
    """

    policy: str
    alpha: float | None = None
    eps: float | None = None
    skip_prob: tuple[float, ...] | None = None
    decay: str | None = None
    never_skip: tuple[int, ...] = (0, -1)

    def __post_init__(self) -> None:
        owner = "LayerSparsity"
        fields.choice(owner, "policy", self.policy, LAYER_POLICIES)
        paper = self.policy == "paper"
        own, other = ("alpha", "eps"), ("skip_prob",)
        if not paper:
            own, other = other, own
        for key in other:
            if getattr(self, key) is not None:
                raise fields.FieldError(owner, key, f"is not used by policy {self.policy}; remove it")
        for key in own:
            if getattr(self, key) is None:
                raise fields.FieldError(owner, key, f"is missing; policy {self.policy} needs it, add it")
        if paper:
            alpha = fields.number(owner, "alpha", self.alpha, 0.0, math.inf, "[0, inf)")
            eps = fields.number(owner, "eps", self.eps, -1.0, 1.0, "[-1, 1]")
            if alpha * (1.0 + abs(eps)) >= 1.0:
                raise fields.FieldError(owner, "alpha", (
                    f"= {alpha} with eps = {eps} gives alpha*(1+|eps|) = {alpha * (1 + abs(eps)):.4g}"
                    " >= 1, so a skip probability would reach 1; lower alpha or |eps|"))
            if self.decay not in (None, "quadratic"):
                raise fields.FieldError(owner, "decay", (
                    f"= {self.decay!r} does not apply to policy paper, which decays as (1-x)**2;"
                    " remove decay or use policy per_layer"))
            object.__setattr__(self, "alpha", alpha)
            object.__setattr__(self, "eps", eps)
            object.__setattr__(self, "decay", "quadratic")
        else:
            probs = fields.sequence(owner, "skip_prob", self.skip_prob, "[0.0, 0.3] (one per layer)")
            probs = tuple(
                fields.number(owner, f"skip_prob[{i}]", p, 0.0, 1.0, "[0, 1)") for i, p in enumerate(probs))
            if not probs:
                raise fields.FieldError(owner, "skip_prob", "is empty; give one probability per layer")
            decay = "linear" if self.decay is None else self.decay
            fields.choice(owner, "decay", decay, DECAY_CURVES)
            object.__setattr__(self, "skip_prob", probs)
            object.__setattr__(self, "decay", decay)
        never = fields.sequence(owner, "never_skip", self.never_skip, "[0, -1]")
        never = tuple(fields.integer(owner, f"never_skip[{i}]", v) for i, v in enumerate(never))
        object.__setattr__(self, "never_skip", never)

    def check_model(self, num_layers: int, where: str = "layers", stage: str | None = None) -> None:
        """Raise ScheduleError if this policy does not fit a model with ``num_layers`` layers.

        Args:
            num_layers: decoder layers in the model.
            where, stage: key path of this mapping and its stage name, for the message.

        Raises:
            ScheduleError: ``skip_prob`` length differs from ``num_layers`` or a ``never_skip``
                index is out of range.
        """
        of = "" if stage is None else f" (stage {stage!r})"
        if self.skip_prob is not None and len(self.skip_prob) != num_layers:
            raise ScheduleError(
                f"{where}.skip_prob{of} has {len(self.skip_prob)} entries but the model has {num_layers}"
                f" layers; give exactly one probability per layer ({num_layers} values)"
            )
        for i, layer in enumerate(self.never_skip):
            if not -num_layers <= layer < num_layers:
                raise ScheduleError(
                    f"{where}.never_skip[{i}]{of} = {layer} is out of range for a model with {num_layers}"
                    f" layers; use indices in [{-num_layers}, {num_layers - 1}]"
                )

    def skip_prob_at(self, progress: float, num_layers: int) -> tuple[float, ...]:
        """Per-layer skip probabilities at stage progress ``x`` in [0, 1] (formulas in class doc).

        Raises:
            ScheduleError: the policy does not fit ``num_layers`` (see :meth:`check_model`).
        """
        self.check_model(num_layers)
        if self.policy == "paper":
            scale = self.alpha * DECAY_CURVES["quadratic"](progress)
            if num_layers == 1:
                probs = [scale]
            else:
                span = num_layers - 1
                probs = [scale * (1.0 + self.eps * (2 * l - span) / span) for l in range(num_layers)]
        else:
            factor = DECAY_CURVES[self.decay](progress)
            probs = [p * factor for p in self.skip_prob]
        for layer in self.never_skip:
            probs[layer] = 0.0
        return tuple(probs)

    @classmethod
    def from_dict(cls, d: Any, where: str = "layers") -> LayerSparsity:
        allowed = ("policy", "alpha", "eps", "skip_prob", "decay", "never_skip")
        d = fields.mapping(d, where, allowed, required=("policy",))
        return fields.build(where, cls, **d)

    def to_dict(self) -> dict:
        if self.policy == "paper":
            d: dict = {"policy": self.policy, "alpha": self.alpha, "eps": self.eps}
        else:
            d = {"policy": self.policy, "skip_prob": list(self.skip_prob), "decay": self.decay}
        d["never_skip"] = list(self.never_skip)
        return d


@dataclass(frozen=True)
class Stage:
    """One training stage; ``tokens``/``layers`` of None mean dense tokens / no layer skipping."""

    name: str
    steps: StepRange | None = None
    tokens: TokenSparsity | None = None
    layers: LayerSparsity | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise fields.FieldError("Stage", "name", f"= {self.name!r} is empty or not text; name the stage")
        for key, kind in (("steps", StepRange), ("tokens", TokenSparsity), ("layers", LayerSparsity)):
            value = getattr(self, key)
            if value is not None and not isinstance(value, kind):
                raise fields.FieldError("Stage", key, f"is a {type(value).__name__}, not a {kind.__name__}")

    @classmethod
    def from_dict(cls, d: Any, where: str = "stage") -> Stage:
        d = fields.mapping(d, where, ("name", "steps", "tokens", "layers"), required=("name",))
        parts = {
            key: None if d.get(key) is None else kind.from_dict(d[key], f"{where}.{key}")
            for key, kind in (("steps", StepRange), ("tokens", TokenSparsity), ("layers", LayerSparsity))
        }
        return fields.build(where, cls, name=d["name"], **parts)

    def to_dict(self) -> dict:
        d: dict = {"name": self.name}
        if self.steps is not None:  # unranged schedules leave steps out entirely
            d["steps"] = self.steps.to_dict()
        d["tokens"] = None if self.tokens is None else self.tokens.to_dict()
        d["layers"] = None if self.layers is None else self.layers.to_dict()
        return d


@dataclass(frozen=True)
class StepPlan:
    """What to drop at one step: ``keep_ratio`` of visual tokens, layer ``l`` with ``skip_prob[l]``."""

    stage: str | None
    step: int
    progress: float
    method: str | None
    keep_ratio: float
    skip_prob: tuple[float, ...]

    @property
    def dense(self) -> bool:
        return self.keep_ratio == 1.0 and all(p == 0.0 for p in self.skip_prob)


@dataclass(frozen=True)
class Schedule:
    """A versioned list of stages; either every stage has a step range or none does."""

    schema_version: int
    source: dict = field(hash=False)
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        owner = "Schedule"
        object.__setattr__(self, "schema_version", _schema_version(owner, self.schema_version))
        if not isinstance(self.source, Mapping):
            raise fields.FieldError(owner, "source", f"is a {type(self.source).__name__}; make it a mapping")
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise fields.FieldError(owner, "stages", "is empty or not a list; list at least one stage")
        object.__setattr__(self, "source", copy.deepcopy(dict(self.source)))
        object.__setattr__(self, "stages", tuple(self.stages))
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise fields.FieldError(owner, f"stages[{i}]", f"is a {type(stage).__name__}, not a Stage")
            if stage.name in seen:
                raise fields.FieldError(owner, f"stages[{i}].name", (
                    f"= {stage.name!r} repeats stages[{seen[stage.name]}].name; give each stage a unique"
                    " name"))
            seen[stage.name] = i
        ranged = [s.steps is not None for s in self.stages]
        if any(ranged) and not all(ranged):
            i = ranged.index(False)
            raise fields.FieldError(owner, f"stages[{i}].steps", (
                f"is missing for stage {self.stages[i].name!r} while other stages have steps;"
                " give every stage steps or none"))
        for i in range(1, len(self.stages) if all(ranged) else 0):
            prev, cur = self.stages[i - 1], self.stages[i]
            a, b = prev.steps, cur.steps
            where = f"stages[{i}].steps.start"
            desc = f"stages[{i - 1}] {prev.name!r} (steps [{a.start}, {a.end}))"
            if b.start < a.start:
                raise fields.FieldError(owner, where, (
                    f"= {b.start} of stage {cur.name!r} comes before {desc}: stages are unordered;"
                    " list stages in step order"))
            if b.start < a.end:
                raise fields.FieldError(owner, where, (
                    f"= {b.start} of stage {cur.name!r} is inside {desc}: stages are overlapping;"
                    f" start it at {a.end} or later"))

    @property
    def ranged(self) -> bool:
        """True when the stages carry global step ranges."""
        return self.stages[0].steps is not None

    def stage_named(self, name: str) -> Stage:
        """The stage called ``name``. Raises ScheduleError listing the names if there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        names = fields.names(s.name for s in self.stages)
        raise ScheduleError(f"schedule has no stage named {name!r}; available stages: {names}")

    def stage_at(self, step: int) -> Stage | None:
        """The stage whose range holds global ``step``, or None between/after ranges.

        Raises:
            ScheduleError: the schedule has no step ranges (pick a stage by name instead).
        """
        if not self.ranged:
            raise ScheduleError("schedule stages have no steps ranges; pick a stage by name (--stage)")
        for stage in self.stages:
            if stage.steps.start <= step < stage.steps.end:
                return stage
        return None

    def check_model(self, num_layers: int) -> None:
        """Raise ScheduleError if any stage's layer policy does not fit ``num_layers`` layers."""
        for i, stage in enumerate(self.stages):
            if stage.layers is not None:
                stage.layers.check_model(num_layers, f"schedule.stages[{i}].layers", stage.name)

    def plan(self, step: int, *, num_layers: int, stage: str | None = None,
             total_steps: int | None = None) -> StepPlan:
        """The token keep ratio and per-layer skip probabilities at ``step``.

        Args:
            step: optimizer step; global for ranged stages, counted from 0 in the run otherwise.
            num_layers: decoder layers in the model.
            stage: stage to use; default: the stage whose range holds ``step`` (dense outside
                all ranges), or the only stage of an unranged schedule.
            total_steps: optimizer steps in the run; needed for a stage without ``steps``,
                whose progress is ``step / total_steps`` clipped to [0, 1].

        Returns:
            A StepPlan. Progress in a ranged stage is ``(step - start) / (end - start)``,
            clipped to [0, 1] when ``stage`` is named and ``step`` lies outside its range.

        Raises:
            ScheduleError: unknown or missing stage name, missing total_steps, bad arguments,
                or a layer policy that does not fit ``num_layers``.
        """
        fields.plan_arg("step", step, minimum=0)
        fields.plan_arg("num_layers", num_layers, minimum=1)
        if stage is not None:
            chosen = self.stage_named(stage)
        elif self.ranged:
            chosen = self.stage_at(step)
            if chosen is None:
                return StepPlan(None, step, 0.0, None, 1.0, (0.0,) * num_layers)
        elif len(self.stages) == 1:
            chosen = self.stages[0]
        else:
            raise ScheduleError(
                f"schedule has {len(self.stages)} stages without steps ranges"
                f" ({fields.names(s.name for s in self.stages)}); pass a stage name (--stage)"
            )
        if chosen.steps is not None:
            progress = (step - chosen.steps.start) / (chosen.steps.end - chosen.steps.start)
        elif total_steps is None:
            raise ScheduleError(
                f"stage {chosen.name!r} has no steps range, so its progress needs total_steps;"
                " pass the number of optimizer steps in this run"
            )
        else:
            progress = step / fields.plan_arg("total_steps", total_steps, minimum=1)
        progress = min(max(progress, 0.0), 1.0)
        if chosen.layers is None:
            skip = (0.0,) * num_layers
        else:
            where = f"schedule.stages[{self.stages.index(chosen)}].layers"
            chosen.layers.check_model(num_layers, where, chosen.name)
            skip = chosen.layers.skip_prob_at(progress, num_layers)
        tokens = chosen.tokens
        return StepPlan(
            stage=chosen.name, step=int(step), progress=progress,
            method=None if tokens is None else tokens.method,
            keep_ratio=1.0 if tokens is None else tokens.keep_ratio_at(progress),
            skip_prob=skip,
        )

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> Schedule:
        """Build and validate a Schedule from plain data (as parsed from YAML).

        Raises:
            ScheduleError: one line naming the key path (``schedule.stages[0].tokens.keep_ratio``)
                and the fix.
        """
        # Check the version first: a newer file may use keys this version does not know.
        if isinstance(d, Mapping) and "schema_version" in d:
            fields.build(where, _schema_version, owner="Schedule", value=d["schema_version"])
        d = fields.mapping(d, where, ("schema_version", "source", "stages"))
        if "schema_version" not in d:
            raise ScheduleError(
                f"{where}.schema_version is missing; add `schema_version: {SCHEMA_VERSION}` at the top")
        source = {} if d.get("source") is None else d["source"]
        if not isinstance(source, Mapping):
            raise ScheduleError(f"{where}.source must be a mapping (got {type(source).__name__})")
        stages = d.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ScheduleError(f"{where}.stages must be a non-empty list of stages; add at least one")
        built = tuple(Stage.from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(stages))
        return fields.build(where, cls, schema_version=d["schema_version"], source=source, stages=built)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "source": copy.deepcopy(self.source),
            "stages": [s.to_dict() for s in self.stages],
        }


def sample_skipped_layers(skip_prob: tuple[float, ...], *, seed: int, step: int) -> tuple[int, ...]:
    """Draw which layers to skip at ``step``: layer ``l`` independently with ``skip_prob[l]``.

    The stream is ``random.Random(f"{seed}:{step}")`` (string seeds hash with SHA-512, not
    ``hash()``), so every rank draws the same layers for the same (seed, step).

    Returns:
        Sorted indices of the skipped layers.
    """
    rng = random.Random(f"{seed}:{step}")
    # Draw for every layer, even p == 0, so layer l always uses the l-th number of the stream.
    return tuple(l for l, p in enumerate(skip_prob) if rng.random() < p)


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, one-line ``[a, b]`` for lists of scalars."""


def _represent_list(dumper: yaml.SafeDumper, data: Any) -> Any:
    flat = all(not isinstance(x, (dict, list, tuple)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=flat)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def load_schedule(path: str | os.PathLike) -> Schedule:
    """Read and validate a schedule.yaml.

    Raises:
        ScheduleError: missing file, broken YAML, or a contract violation; the message starts
            with the path.
    """
    data = read_yaml(path, "schedule.yaml", error=ScheduleError)
    if not isinstance(data, Mapping):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise ScheduleError(f"{path}: top level is {got}, not a mapping; start it with `schema_version: 1`")
    try:
        return Schedule.from_dict(data)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None


def dump_schedule(schedule: Schedule, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``schedule`` as YAML atomically (temp file in the same folder, then rename).

    Returns:
        The path written.

    Raises:
        ScheduleError: ``path`` exists and ``overwrite`` is False.
    """
    path = check_file_target(path, ScheduleError, example="schedule.yaml")
    if path.exists() and not overwrite:
        raise ScheduleError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    text = yaml.dump(schedule.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, text)
