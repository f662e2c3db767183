"""Derive a stage schedule from the profiler's tables and a compute or quality budget.

    sts-profile schedule analysis/ --target-speedup 1.8 -o schedule.yaml

Library::

    budget = Budget(target_speedup=1.8)                 # or Budget(max_loss_increase=0.05)
    sched = derive_schedule(layers, tokens, num_layers=8, num_visual_tokens=576, budget=budget,
                            provenance={"tables": "analysis/"}, dims=dims, text_len=64)

Rules per stage of the tables (plain, documented choices):

* **Checkpoints**: a stage uses only its own; deltas (``compress_loss_delta``,
  ``skip_loss_delta``) are the *max* over them, so an option holds at every checkpoint.
* **Frozen LLM** -> no layer skipping: ``llm_frozen`` when given (the analysis compares decoder
  weights), else layer metrics identical across >= 2 checkpoints (:func:`frozen_stages`), else
  the stage is frozen iff it is named ``alignment`` (changing metrics do not show a trained
  LLM: a trained projector alone moves every layer's hidden states).
* **Cost**: analytic LLM FLOPs (:mod:`sts_train.flops`) at ``text_len`` + kept visual tokens,
  ratio of sums over 200 progress points (as the trainer reports it); the backward factor
  cancels. Without ``dims`` a layer costs in proportion to its sequence length.
* **Layers**: sensitivity ``s_l`` = ``skip_loss_delta`` (fallback ``block_influence``: loss
  unknown); ``p_l = min(0.9, c * m / (s_l + m))``, ``m`` the median ``s_l`` of the skippable
  layers, one scale ``c``; first/last and unmeasured layers 0; ``p_l`` is the rate at the
  stage start and decays along the layer curve (below). Predicted loss, averaged over the
  stage like the cost: ``mean_x sum_l p_l(x) * max(s_l, 0)`` (skips taken as independent).
* **Decay** (:func:`fit_decay`): a "need" series (layers: mean ``block_influence`` of the less
  sensitive half; tokens: 1 - ``mergeable_frac`` averaged over its similarity thresholds,
  fallback ``1 - neighbor_cosine``) rising by
  more than 5% first to last (tokens: and by more than 0.01, one point of the token
  fraction) means redundancy shrinks: the curve (linear/quadratic/cosine) whose affine
  fit ``need ~ a + b * (1 - f(x))`` has the least squared residual (ties: linear); else
  tokens ``constant`` and layers ``quadratic`` (the paper's ``(1 - x)^2``): layer skipping
  always anneals to the dense model, which evaluation runs, by the stage end (stochastic
  depth that ends dense; in an ad hoc run on two demo seeds, the same skipping held
  constant trained 9 and 19 points worse). Annealed, layers alone save less: at most
  ``0.9 * mean(f)`` of each skippable layer. One checkpoint: layers ``linear``, tokens
  ``constant``.
* **Token curve**: ``keep_ratio_end = min(1, keep_ratio * need_last / need_first)`` along that
  curve (the ratio follows the fraction of distinct tokens; never below the measured start).
* **Token loss**: an option's ``loss_delta`` is the largest measured delta of its method at
  its own or any milder keep ratio, and at least 0 (``measured_loss_delta`` keeps the probe's
  value), so a harsher ratio never ranks as cheaper than a milder one, or than dense, on
  probe noise. A keep ratio between
  measured ones takes the chord between its neighbours' deltas and standard errors, by the
  fraction of tokens each keeps (a pooled grid keeps k*k): exact where the loss is linear in
  it, an upper bound where it is convex (the probes measure each halving costlier than the
  one before). Above the mildest probe (keep 0.5 by default) the chord runs to dense (loss
  0): assumed, not measured.
* **Options**: dense tokens, each measured token option, and each kept fraction between the
  harshest probe and dense (every uniform-pooled grid of a square grid, else steps of 1/32);
  with ``target_speedup`` also the keep ratio that reaches the target alone, and no
  in-between fraction harsher than it (tokens alone would overshoot the target).
* **Budget** ``max_loss_increase``: of the token options within tolerance, with the rest of
  the tolerance spent on layers, the highest predicted speedup (no layers: the cheapest
  option within tolerance). ``target_speedup``: of the token options plus just enough layer
  skipping that reach the target, the smallest predicted loss (but see probe noise); the
  chosen option's predicted loss is recorded as the derived tolerance. Unknown layer loss
  ranks worse than any known loss.
* **Probe noise** (``target_speedup``): an option's standard error is its token probe's
  (``compress_loss_delta_se``) plus the stage's mean of ``sum_l p_l(x) * se_l`` of the layer probes
  (``skip_loss_delta_se``; summed, an upper bound for any correlation between probes on the
  same samples). Each token method (and dense tokens) stands as its own lowest predicted
  loss; methods within 2 standard errors of the lowest (``sqrt(se_a^2 + se_b^2)``:
  conservative, as the probes share their samples) are a tie the probes cannot break. It
  goes to uniform pooling, then merge, then the rest by predicted loss. Pooling and merging keep every
  patch's content; the probes score the one-shot loss of a model not trained with
  compression, not how training adapts to each method. Tables without standard errors break
  ties only on equal losses.

The trend fitting, cost model and candidate search live in :mod:`sts_profile.derive_search`;
their public names are re-exported here.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from sts_profile.derive_search import (
    MAX_SKIP_PROB, PROGRESS_POINTS, TREND_MIN_REL_RISE, _choose, _layer_model, _token_options,
    _token_trend, fit_decay, predicted_speedup,
)
from sts_profile.discover import stage_rank
from sts_train.errors import StsError
from sts_train.flops import LayerDims
from sts_train.schedule import (
    SCHEMA_VERSION, LayerSparsity, Schedule, Stage, StepRange, TokenSparsity, dump_schedule,
)

__all__ = [
    "FROZEN_ATOL", "FROZEN_RTOL", "MAX_SKIP_PROB", "POLICIES", "PROGRESS_POINTS", "TREND_MIN_REL_RISE",
    "Budget", "derive_from_tables_dir", "derive_schedule", "fit_decay", "frozen_stages",
    "paper_schedule", "predicted_speedup",
]

POLICIES = ("profile", "paper")
FROZEN_RTOL, FROZEN_ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class Budget:
    """What the derived schedule must achieve.

    Args:
        target_speedup: predicted LLM FLOPs ratio dense/sparse per stage (> 1), or
        max_loss_increase: tolerated predicted loss increase per stage (>= 0); exactly one of
            the two for policy ``profile``, neither for ``paper``.
        policy: ``profile`` (derive from measurements) or ``paper`` (the fixed formula).
        alpha, eps: the paper formula's parameters (policy ``paper`` only).

    Raises:
        StsError: one line naming the option (``--target-speedup``) and the fix.
    """

    target_speedup: float | None = None
    max_loss_increase: float | None = None
    policy: str = "profile"
    alpha: float = 0.5
    eps: float = 0.2

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise StsError(f"--policy {self.policy!r} is not known; use one of: {', '.join(POLICIES)}")
        given = [k for k in ("target_speedup", "max_loss_increase") if getattr(self, k) is not None]
        if self.policy == "paper":
            if given:
                raise StsError(f"--{given[0].replace('_', '-')} does not apply to --policy paper (its"
                               " rates are fixed by --alpha/--eps); remove it or use --policy profile")
            alpha, eps = _real("--alpha", self.alpha), _real("--eps", self.eps)
            if alpha < 0:
                raise StsError(f"--alpha {alpha} is negative; pass a value in [0, 1)")
            if not -1.0 <= eps <= 1.0:
                raise StsError(f"--eps {eps} is outside [-1, 1]; pass a value in [-1, 1]")
            if alpha * (1 + abs(eps)) >= 1.0:
                raise StsError(f"--alpha {alpha} with --eps {eps} gives alpha*(1+|eps|) ="
                               f" {alpha * (1 + abs(eps)):.4g} >= 1, so a skip probability would"
                               " reach 1; lower --alpha or --eps")
            return
        if len(given) == 2:
            raise StsError("--target-speedup and --max-loss-increase were both given; pass only one")
        if not given:
            raise StsError("--policy profile needs a budget; pass --target-speedup (e.g. 1.8) or"
                           " --max-loss-increase (e.g. 0.05)")
        if self.target_speedup is not None and _real("--target-speedup", self.target_speedup) <= 1.0:
            raise StsError(f"--target-speedup {self.target_speedup} is not above 1 (it is dense FLOPs"
                           " / sparse FLOPs); pass a number > 1, e.g. 1.8")
        if self.max_loss_increase is not None and _real("--max-loss-increase", self.max_loss_increase) < 0:
            raise StsError(f"--max-loss-increase {self.max_loss_increase} is negative; pass a"
                           " tolerated loss increase >= 0, e.g. 0.05")


def _real(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StsError(f"{option} {value!r} is not a finite number; pass a number")
    return float(value)


# ---------------------------------------------------------------- measurements from the tables

def _stage_order(*tables: pd.DataFrame | None) -> list[str]:
    """Stages in the tables, ordered by their first step (on ties: alignment/pretrain, then
    instruction/finetune, then by name)."""
    first: dict[str, int] = {}
    for df in tables:
        if df is None or df.empty:
            continue
        for stage, step in df.groupby("stage")["step"].min().items():
            first[str(stage)] = min(int(step), first.get(str(stage), int(step)))
    return sorted(first, key=lambda s: (first[s], stage_rank(s), s))


def _checkpoints(*tables: pd.DataFrame | None) -> list[tuple[str, int, str]]:
    """Distinct ``(checkpoint, step, stage)`` rows of the tables, by step."""
    rows = pd.concat([t[["checkpoint", "step", "stage"]] for t in tables if t is not None and not t.empty])
    if rows.empty:
        return []
    rows = rows.drop_duplicates().sort_values(["step", "checkpoint"])
    return [(str(c), int(s), str(g)) for c, s, g in rows.itertuples(index=False)]


def frozen_stages(layers: pd.DataFrame | None) -> list[str]:
    """Stages whose layer metrics do not change across their checkpoints (a frozen LLM).

    A stage counts as frozen when it has two or more checkpoints and, for every (layer,
    token_type, metric), ``max - min <= 1e-6 + 1e-4 * |max|`` over them (tolerant of bf16 and
    kernel nondeterminism, far below real training drift).

    Returns:
        Stage names in step order.
    """
    out = []
    if layers is None or layers.empty:
        return out
    for stage in _stage_order(layers):
        df = layers[layers["stage"] == stage]
        if df["checkpoint"].nunique() < 2:
            continue
        spread = df.groupby(["layer", "token_type", "metric"])["value"].agg(["min", "max"]).dropna()
        if not spread.empty and bool(((spread["max"] - spread["min"]).abs()
                                      <= FROZEN_ATOL + FROZEN_RTOL * spread["max"].abs()).all()):
            out.append(stage)
    return out


# ---------------------------------------------------------------------------- public entry points

def _plain(obj: Any) -> Any:
    """YAML-safe copy: numpy scalars to Python, floats to 6 significant digits, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, pd.Index)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.6g}") if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _empty(df: pd.DataFrame | None) -> pd.DataFrame:
    columns = ["checkpoint", "step", "stage", "layer", "token_type", "metric", "method", "keep_ratio",
               "threshold", "value"]
    return pd.DataFrame(columns=columns) if df is None else df


def _ordered_stages(names: list[str], stage_steps: Mapping[str, tuple[int, int]] | None,
                    ) -> list[tuple[str, StepRange | None]]:
    if stage_steps is None:
        return [(n, None) for n in names]
    missing = [n for n in names if n not in stage_steps]
    if missing:
        raise StsError(f"stage_steps has no step range for stage {missing[0]!r}; give [start, end) for"
                       f" every measured stage ({', '.join(names)}) or none")
    ranges = [(n, StepRange(int(stage_steps[n][0]), int(stage_steps[n][1]))) for n in names]
    return sorted(ranges, key=lambda item: item[1].start)


def derive_schedule(layers: pd.DataFrame | None, tokens: pd.DataFrame | None, *, num_layers: int,
                    num_visual_tokens: int, budget: Budget, provenance: Mapping,
                    stage_steps: Mapping[str, tuple[int, int]] | None = None,
                    dims: LayerDims | None = None, text_len: int | None = None,
                    llm_frozen: Mapping[str, bool] | None = None) -> Schedule:
    """Derive a schedule, stage by stage, from the profiler's tables (rules in the module doc).

    Args:
        layers, tokens: the profiler's tidy tables (either may be None or empty).
        num_layers, num_visual_tokens: static model facts (decoder layers, tokens per image).
        budget: a :class:`Budget`; policy ``paper`` returns :func:`paper_schedule`.
        provenance: extra facts for ``source`` (e.g. the tables folder).
        stage_steps: ``{stage: (start, end)}`` global step ranges; None gives unranged stages
            that ``sts-train`` runs by name.
        dims: layer sizes for the analytic FLOPs; None: cost proportional to sequence length.
        text_len: text tokens per sample; None is taken as 0 (token speedups are upper bounds).
        llm_frozen: ``{stage: bool}`` overriding the frozen-LLM detection.

    Returns:
        A validated :class:`Schedule` whose ``source`` holds the measurements used, the
        budget and the predicted speedup per stage.

    Raises:
        StsError: empty tables, layers beyond ``num_layers``, or missing stage step ranges.
    """
    layers, tokens = _empty(layers), _empty(tokens)
    if budget.policy == "paper":
        return paper_schedule(alpha=budget.alpha, eps=budget.eps, provenance=provenance,
                              stage_steps=stage_steps)
    names = _stage_order(layers, tokens)
    if not names:
        raise StsError("the tables hold no measurements; run `sts-profile analyze` on a run first")
    if not layers.empty and int(layers["layer"].max()) >= num_layers:
        raise StsError(f"the layer table has layer {int(layers['layer'].max())} but num_layers ="
                       f" {num_layers}; pass the model's number of decoder layers")
    frozen_measured = set(frozen_stages(layers))
    cost_args = {"num_layers": num_layers, "dims": dims, "text_len": int(text_len or 0),
                 "num_visual_tokens": num_visual_tokens}
    stages, derivation = [], {}
    for name, steps in _ordered_stages(names, stage_steps):
        rng = None if steps is None else (steps.start, steps.end)
        ldf, tdf = layers[layers["stage"] == name], tokens[tokens["stage"] == name]
        n_ckpt = len(_checkpoints(ldf, tdf))
        if llm_frozen is not None and name in llm_frozen:
            frozen, by = bool(llm_frozen[name]), "given"
        elif name in frozen_measured:
            frozen, by = True, "measured: layer metrics identical across checkpoints"
        elif ldf["checkpoint"].nunique() >= 2:  # a trained projector alone moves every layer metric
            frozen, by = name == "alignment", "stage name (layer metrics changed; the weights were not compared)"
        else:
            frozen, by = name == "alignment", "stage name (one checkpoint: cannot be measured)"
        layer_model, layer_info = (None, {"reason": "LLM frozen in this stage"}) if frozen else \
            _layer_model(ldf, num_layers, rng)
        options = _token_options(tdf)
        relax, curve, trend = _token_trend(tdf, rng)
        best = _choose(options, layer_model, relax, curve, budget, cost_args)
        lay = None
        if any(p > 0 for p in best["skip_prob"]):
            lay = LayerSparsity("per_layer", skip_prob=tuple(best["skip_prob"]), decay=layer_model.decay)
        stage = Stage(name, steps=steps, tokens=best["tokens"], layers=lay)
        stages.append(stage)
        speedup = predicted_speedup(Schedule(SCHEMA_VERSION, {}, (stage,)), stage=name, **cost_args)
        derivation[name] = {
            "checkpoints": [{"checkpoint": c, "step": s} for c, s, _ in _checkpoints(ldf, tdf)],
            "llm_frozen": frozen, "llm_frozen_by": by,
            "token_options": options, "token_trend": trend, "layer_sensitivity": layer_info,
            "choice": {k: best[k] for k in ("kind", "token_loss_delta", "token_loss_se", "interpolated_between",
                                            "layer_loss", "layer_loss_se", "predicted_loss_increase",
                                            "predicted_loss_se", "candidates",
                                            "ties", "lowest_loss_option") if best.get(k) is not None},
            "predicted_speedup": speedup,
        }
        if budget.target_speedup is not None:
            derivation[name]["choice"]["derived_tolerance"] = best["predicted_loss_increase"]
            derivation[name]["target_met"] = best["target_met"]
            if not best["target_met"]:
                warnings.warn(f"stage {name!r}: target speedup {budget.target_speedup} is not reachable"
                              f" with the measured options; best predicted {speedup:.3f}", stacklevel=2)
        if n_ckpt < 2:
            derivation[name]["note"] = "one checkpoint: no trend could be measured"
    notes = [] if text_len is not None else ["text_len unknown: taken as 0, token speedups are upper bounds"]
    source = {
        **dict(provenance), "tool": "sts-profile", "version": _version(), "policy": "profile",
        "budget": {k: v for k, v in asdict(budget).items() if v is not None and k not in ("alpha", "eps")},
        "model": {"num_layers": num_layers, "num_visual_tokens": num_visual_tokens, "text_len": text_len,
                  "dims": None if dims is None else asdict(dims)},
        "cost_model": "analytic LLM FLOPs (sts_train.flops)" if dims else "proportional to sequence length",
        "checkpoints": [{"checkpoint": c, "step": s, "stage": g} for c, s, g in _checkpoints(layers, tokens)],
        "predicted_speedup": {n: r["predicted_speedup"] for n, r in derivation.items()},
        "derivation": derivation, "notes": notes,
    }
    return Schedule(SCHEMA_VERSION, _plain(source), tuple(stages))


def _version() -> str:
    from sts_profile import __version__

    return __version__


def paper_schedule(*, alpha: float, eps: float, provenance: Mapping, token_method: str = "uniform",
                   keep_ratio: float = 0.25, never_skip: tuple[int, ...] = (0, -1),
                   stage_steps: Mapping[str, tuple[int, int]] | None = None) -> Schedule:
    """The paper's fixed schedule: alignment compresses tokens, instruction skips layers.

    ``p_l(x) = alpha * (1 - x)**2 * (1 + eps * (2l - (L-1)) / (L-1))`` (arXiv 2509.18150).

    Raises:
        StsError: alpha/eps or keep_ratio outside the contract, or missing stage ranges.
    """
    Budget(policy="paper", alpha=alpha, eps=eps)
    names = ["alignment", "instruction"]
    parts = {"alignment": {"tokens": TokenSparsity(token_method, keep_ratio)},
             "instruction": {"layers": LayerSparsity("paper", alpha=alpha, eps=eps, never_skip=tuple(never_skip))}}
    stages = tuple(Stage(n, steps=r, **parts[n]) for n, r in _ordered_stages(names, stage_steps))
    source = {**dict(provenance), "tool": "sts-profile", "version": _version(), "policy": "paper",
              "formula": "p_l(x) = alpha * (1 - x)**2 * (1 + eps * (2l - (L-1)) / (L-1))",
              "alpha": alpha, "eps": eps, "token_method": token_method, "keep_ratio": keep_ratio}
    return Schedule(SCHEMA_VERSION, _plain(source), stages)


def _read_table(folder: Path, name: str) -> pd.DataFrame | None:
    for path, reader in ((folder / f"{name}.parquet", pd.read_parquet), (folder / f"{name}.csv", pd.read_csv)):
        if path.is_file():
            try:
                df = reader(path)
            except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
                raise StsError(f"{path}: cannot be read ({type(exc).__name__}); re-run `sts-profile"
                               " analyze` to rewrite it") from None
            if "method" in df:
                df["method"] = df["method"].fillna("")
            return df
    return None


def derive_from_tables_dir(tables_dir: str | Path, budget: Budget, out_path: str | Path,
                           overwrite: bool = False) -> Path:
    """Read an analysis folder (tables + ``analysis.json``), derive and write ``schedule.yaml``.

    Args:
        tables_dir: folder with ``layers.parquet``, ``tokens.parquet`` (CSV also read) and
            ``analysis.json`` (num_layers, num_visual_tokens, text_len, dims, optional
            stage_steps and llm_frozen; missing optional keys are tolerated).
        budget: the :class:`Budget`.
        out_path: where to write the schedule (atomically).
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        StsError: not an analysis folder, unreadable tables, missing model facts, an existing
            output without ``overwrite``.
    """
    tables_dir, out_path = Path(tables_dir), Path(out_path)
    if not tables_dir.is_dir():
        raise StsError(f"{tables_dir}: not a folder; pass the --out folder of `sts-profile analyze`")
    if out_path.exists() and not overwrite:
        raise StsError(f"{out_path} already exists; pass --overwrite to replace it")
    manifest_path, manifest = tables_dir / "analysis.json", {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StsError(f"{manifest_path}: not valid JSON; re-run `sts-profile analyze`") from None
        if not isinstance(manifest, dict) or any(
                not isinstance(manifest.get(key, 0), int) for key in ("num_layers", "num_visual_tokens")):
            raise StsError(f"{manifest_path}: not the manifest `sts-profile analyze` writes; re-run it")
    layers, tokens = _read_table(tables_dir, "layers"), _read_table(tables_dir, "tokens")
    if budget.policy == "profile" and layers is None and tokens is None:
        raise StsError(f"{tables_dir}: no layers.parquet or tokens.parquet; pass the --out folder of"
                       " `sts-profile analyze`")
    num_layers = manifest.get("num_layers")
    if num_layers is None and layers is not None and not layers.empty:
        num_layers = int(layers["layer"].max()) + 1
    num_visual = manifest.get("num_visual_tokens")
    if budget.policy == "profile" and (num_layers is None or num_visual is None):
        key = "num_layers" if num_layers is None else "num_visual_tokens"
        raise StsError(f"{manifest_path}: key {key} is missing; re-run `sts-profile analyze` to write it")
    dims_d = manifest.get("dims") or {}
    keys = [f.name for f in fields(LayerDims)]
    dims = LayerDims(**{k: int(dims_d[k]) for k in keys}) if all(k in dims_d for k in keys) else None
    steps = manifest.get("stage_steps")
    provenance = {"tables": str(tables_dir)}
    schedule = derive_schedule(
        layers, tokens, num_layers=int(num_layers or 1), num_visual_tokens=int(num_visual or 1),
        budget=budget, provenance=provenance, dims=dims, text_len=manifest.get("text_len"),
        stage_steps=None if not steps else {k: tuple(v) for k, v in steps.items()},
        llm_frozen=manifest.get("llm_frozen"))
    return dump_schedule(schedule, out_path, overwrite=overwrite)
