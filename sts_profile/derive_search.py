"""The search behind :mod:`sts_profile.derive`: trend fitting, cost model, per-stage choice.

Internal to the derivation (the rules are in :mod:`sts_profile.derive`, which re-exports the
public names): :func:`fit_decay` picks a decay curve from a "need" series,
:func:`predicted_speedup` and ``_cost`` sum analytic LLM FLOPs over the progress grid, and
``_choose`` shapes the skip probabilities (``_Layers``) and searches the token options for the
best one under a :class:`~sts_profile.derive.Budget`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sts_train.flops import LayerDims, layer_flops_fwd, lm_head_flops_fwd
from sts_train.schedule import DECAY_CURVES, Schedule, TokenSparsity

if TYPE_CHECKING:
    from sts_profile.derive import Budget

MAX_SKIP_PROB = 0.9
TREND_MIN_REL_RISE = 0.05
# The distinct-token fraction must also grow by one point (6 of 576 tokens): a rise from 1 to
# 1.3 tokens per image is 30% relative, but noise, not a trend.
TOKEN_TREND_MIN_ABS_RISE = 0.01
PROGRESS_POINTS = 200
# Layer skipping anneals to the dense model (which evaluation runs) by the end of its stage: when
# the need of the skippable layers does not rise, the paper's (1 - x)^2, not constant.
ANNEAL_CURVE = "quadratic"
# Options whose predicted losses differ by less than TIE_Z standard errors of the probes
# (sqrt(se_a^2 + se_b^2), about 95%) are a tie that the probes cannot break; the tie goes to the
# method that summarises every patch in a fixed grid (uniform pooling), then the one that merges
# every patch into a kept one (merge), then the rest by predicted loss. Trained at the demo's
# settings on four seeds where pooling was 0.8-1.9 points below dense, merging instead was level
# with dense in two, 1.8 below in one and stalled in one (bench/README.md, arm_variant.py): not
# enough to change the order.
TIE_Z = 2.0
METHOD_RANK = {"uniform": 0, "merge": 1}
_FITTED_CURVES = ("linear", "quadratic", "cosine")


# ---------------------------------------------------------------------------- trend fitting


def _per_checkpoint_layer(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``step x layer`` values of ``metric``: token_type ``all`` if measured, else the mean."""
    m = df[df["metric"] == metric]
    if (m["token_type"] == "all").any():
        m = m[m["token_type"] == "all"]
    return m.groupby(["step", "layer"])["value"].mean().unstack("layer").sort_index()


def fit_decay(progress: list[float], need: list[float], *, min_abs_rise: float = 0.0) -> tuple[str, dict]:
    """Pick the decay curve whose shape best fits a rising "need" series.

    Rules: the **Decay** item of :mod:`sts_profile.derive`.

    Args:
        progress: stage progress in [0, 1] of each checkpoint, increasing.
        need: the measured need per checkpoint (higher = less redundant).
        min_abs_rise: the rise (last - first) must also exceed this, in the units of ``need``.

    Returns:
        ``(curve, info)``; info holds the relative rise and the residual of each curve.
    """
    x, y = np.asarray(progress, float), np.asarray(need, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return "constant", {"reason": "fewer than two checkpoints"}
    if np.ptp(x) == 0:
        return "constant", {"reason": "every checkpoint at the same stage progress"}
    rise = float((y[-1] - y[0]) / max(abs(y[0]), 1e-12))
    info: dict = {"rel_rise": rise}
    if rise <= TREND_MIN_REL_RISE or y[-1] - y[0] <= min_abs_rise:
        return "constant", info
    residual = {}
    for name in _FITTED_CURVES:
        f = np.array([1.0 - DECAY_CURVES[name](v) for v in x])
        design = np.stack([np.ones_like(f), f], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        residual[name] = float(np.sum((design @ coef - y) ** 2)) if coef[1] > 0 else math.inf
    info["residual"] = residual
    total = float(np.sum((y - y.mean()) ** 2))  # > 0 after the rise check; need has any unit
    best = min(_FITTED_CURVES, key=lambda n: (round(residual[n] / total, 9), _FITTED_CURVES.index(n)))
    return best, info


def _mean_over_progress(f) -> float:
    """Mean of ``f(x)`` over the progress grid the cost model sums over."""
    return sum(f((i + 0.5) / PROGRESS_POINTS) for i in range(PROGRESS_POINTS)) / PROGRESS_POINTS


def _progress(steps: list[int], stage_range: tuple[int, int] | None) -> list[float]:
    if stage_range is not None:
        start, end = stage_range
        return [min(max((s - start) / (end - start), 0.0), 1.0) for s in steps]
    lo, hi = min(steps), max(steps)
    return [0.0 if hi == lo else (s - lo) / (hi - lo) for s in steps]


# ---------------------------------------------------------------------------- cost model

def _kept_visual(method: str | None, num_visual_tokens: int, keep_ratio: float) -> int:
    """Visual tokens the trainer's compressor keeps (pooled grid for uniform on a square grid)."""
    from sts_train.compress import kept_count, pooled_grid  # imports torch: keep it lazy

    if method is None or keep_ratio >= 1.0:
        return num_visual_tokens
    side = math.isqrt(num_visual_tokens)
    if method == "uniform" and side * side == num_visual_tokens:
        rows, cols = pooled_grid((side, side), keep_ratio)
        return rows * cols
    return kept_count(num_visual_tokens, keep_ratio)


def _seq_cost(seq_len: int, dims: LayerDims | None) -> tuple[float, float]:
    """(one decoder layer, LM head) forward FLOPs at ``seq_len``; linear model without dims."""
    if dims is None:
        return float(seq_len), 0.0
    return float(layer_flops_fwd(seq_len, dims)["total"]), lm_head_flops_fwd(seq_len, dims)


@dataclass
class _Cost:
    """Sums over the progress grid: sparse total = ``base - S * fa`` for ``S = sum_l p_l(0)``."""

    dense: float
    base: float
    fa: float

    def speedup(self, total_skip: float) -> float:
        return self.dense / (self.base - total_skip * self.fa)


def _cost(tokens: TokenSparsity | None, decay: str, *, num_layers: int, dims: LayerDims | None,
          text_len: int, num_visual_tokens: int) -> _Cost:
    layer_d, head_d = _seq_cost(text_len + num_visual_tokens, dims)
    dense = base = fa = 0.0
    for i in range(PROGRESS_POINTS):
        x = (i + 0.5) / PROGRESS_POINTS
        ratio = 1.0 if tokens is None else tokens.keep_ratio_at(x)
        kept = _kept_visual(None if tokens is None else tokens.method, num_visual_tokens, ratio)
        layer, head = _seq_cost(text_len + kept, dims)
        dense += num_layers * layer_d + head_d
        base += num_layers * layer + head
        fa += DECAY_CURVES[decay](x) * layer
    return _Cost(dense, base, fa)


def predicted_speedup(schedule: Schedule, *, num_layers: int, dims: LayerDims | None, text_len: int,
                      num_visual_tokens: int, stage: str) -> float:
    """Predicted LLM FLOPs ratio dense / sparse of one stage, averaged over its progress.

    Sums the analytic training FLOPs (:mod:`sts_train.flops`; expected skipped layers
    ``sum_l p_l(x)``) over 200 progress points and returns ``sum dense / sum sparse``.

    Raises:
        ScheduleError: no stage named ``stage`` or a layer policy that does not fit.
    """
    chosen = schedule.stage_named(stage)
    layer_d, head_d = _seq_cost(text_len + num_visual_tokens, dims)
    dense = sparse = 0.0
    for i in range(PROGRESS_POINTS):
        x = (i + 0.5) / PROGRESS_POINTS
        tok = chosen.tokens
        kept = _kept_visual(None if tok is None else tok.method, num_visual_tokens,
                            1.0 if tok is None else tok.keep_ratio_at(x))
        skipped = 0.0 if chosen.layers is None else sum(chosen.layers.skip_prob_at(x, num_layers))
        layer, head = _seq_cost(text_len + kept, dims)
        dense += num_layers * layer_d + head_d
        sparse += (num_layers - skipped) * layer + head
    return dense / sparse


# ---------------------------------------------------------------------------- per-stage choice

@dataclass
class _Layers:
    """Skip shape of a stage: ``p_l = min(0.9, c * w_l)``; ``delta`` is None when loss is unknown,
    ``se`` the probes' standard errors (0 where not measured)."""

    weights: list[float]
    delta: list[float] | None
    decay: str
    se: list[float] | None = None

    def probs(self, scale: float) -> list[float]:
        return [min(MAX_SKIP_PROB, scale * w) for w in self.weights]

    @cached_property
    def mean_factor(self) -> float:
        """Mean of the decay curve over the stage's progress grid: ``p_l(x)`` averages ``p_l * this``."""
        return _mean_over_progress(DECAY_CURVES[self.decay])

    @property
    def top_scale(self) -> float:
        return MAX_SKIP_PROB / min(w for w in self.weights if w > 0)

    @property
    def max_total(self) -> float:
        return MAX_SKIP_PROB * sum(w > 0 for w in self.weights)

    def loss(self, probs: list[float]) -> float:
        """Predicted loss increase averaged over the stage: ``mean_x sum_l p_l(x) * max(s_l, 0)``."""
        if self.delta is None:
            return math.nan
        return self.mean_factor * float(sum(p * max(d, 0.0) for p, d in zip(probs, self.delta)))

    def loss_se(self, probs: list[float]) -> float:
        """``mean_x sum_l p_l(x) * se_l``: an upper bound of the standard error of :meth:`loss`
        for any correlation between the layer probes (they share the calibration samples)."""
        return 0.0 if self.se is None else self.mean_factor * float(sum(p * e for p, e in zip(probs, self.se)))

    def scale_for_total(self, total: float) -> float:
        """Smallest scale (within 1e-12) whose ``sum_l p_l`` reaches ``total``."""
        lo, hi = 0.0, self.top_scale
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if sum(self.probs(mid)) < total else (lo, mid)
        return hi

    def scale_for_loss(self, tolerance: float) -> float:
        """Largest scale whose predicted loss stays within ``tolerance``."""
        lo, hi = 0.0, self.top_scale
        if self.loss(self.probs(hi)) <= tolerance:
            return hi
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.loss(self.probs(mid)) <= tolerance else (lo, mid)
        return lo


def _layer_model(df: pd.DataFrame, num_layers: int, steps_range: tuple[int, int] | None,
                 ) -> tuple[_Layers | None, dict]:
    """The skip shape of a stage (None if no skippable layer is measured) and its provenance."""
    metric, sens = None, {}
    for metric in ("skip_loss_delta", "block_influence"):
        values = _per_checkpoint_layer(df, metric).max(axis=0)
        sens = {int(l): float(v) for l, v in values.items() if np.isfinite(v)}
        if sens:
            break
    else:
        metric = None
    info: dict = {"metric": metric, "values": [sens.get(l) for l in range(num_layers)]}
    eligible = [l for l in range(1, num_layers - 1) if l in sens]
    if not eligible:
        info["reason"] = "no skippable layer measured (first and last are never skipped)"
        return None, info
    clipped = {l: max(sens[l], 0.0) for l in eligible}
    ref = float(np.median(list(clipped.values()))) or float(np.mean(list(clipped.values())))
    weights = [0.0] * num_layers
    for l in eligible:
        weights[l] = 1.0 if ref <= 0 else ref / (clipped[l] + ref)
    delta = se = None
    if metric == "skip_loss_delta":
        delta = [sens.get(l, 0.0) if weights[l] > 0 else 0.0 for l in range(num_layers)]
        errors = _per_checkpoint_layer(df, "skip_loss_delta_se").max(axis=0)
        if not errors.empty:  # NaN (one sample) counts as no known noise
            se = [float(errors.get(l, 0.0)) if weights[l] > 0 and np.isfinite(errors.get(l, np.nan)) else 0.0
                  for l in range(num_layers)]
            info["se"] = se
    # The decay follows the need of the layers that will skip most (the less sensitive half).
    low = [l for l in eligible if clipped[l] <= ref]
    signal = "block_influence" if not _per_checkpoint_layer(df, "block_influence").empty else metric
    table = _per_checkpoint_layer(df, signal).reindex(columns=low).dropna(how="all")
    need = table.mean(axis=1)
    if len(need) >= 2:
        decay, fit = fit_decay(_progress(list(need.index), steps_range), list(need.values))
        if decay == "constant":
            decay, fit = ANNEAL_CURVE, {**fit, "reason": "need does not rise: anneal to dense by the stage end"}
    else:
        decay, fit = "linear", {"reason": "fewer than two checkpoints; linear by default"}
    info["decay"] = {"signal": signal, "layers": low, "need": list(need.values), "curve": decay, **fit}
    return _Layers(weights, delta, decay, se), info


def _token_options(df: pd.DataFrame) -> list[dict]:
    """Measured (method, keep_ratio) with the max ``compress_loss_delta`` over checkpoints.

    ``measured_loss_delta`` is that max; ``loss_delta``, the value the search ranks by, is the
    largest measured delta of the same method at this or any milder (higher) keep ratio, and at
    least 0 (dense): keeping fewer tokens cannot be credited with less loss than keeping more,
    or than keeping all (a negative probe delta is noise: taken as it is, the chord from dense
    would fall with every token dropped, and the search would overshoot). A probe on a few
    calibration samples can measure the harsher ratio as cheaper; taken at face value, that
    noise makes the search overshoot the budget (the demo picked keep 0.25, 3.0x, at target 2x).

    ``loss_delta_se`` is the largest ``compress_loss_delta_se`` (the probe's standard error over
    calibration samples) over the same checkpoints, at this or any milder keep ratio of the
    method; 0 where the tables lack it or it is NaN (fewer than two samples): no known noise.
    """
    def per_option(metric: str) -> pd.Series:
        m = df[(df["metric"] == metric) & df["method"].isin(["uniform", "random", "text_guided", "merge"])
               & (df["keep_ratio"] > 0) & (df["keep_ratio"] < 1)]
        return m.groupby(["method", "keep_ratio", "step"])["value"].mean().groupby(["method", "keep_ratio"]).max()

    per = per_option("compress_loss_delta")
    if per.empty:
        return []
    per = per[np.isfinite(per.astype(float))]
    se = per_option("compress_loss_delta_se").reindex(per.index).fillna(0.0)
    envelope, se_envelope = (v.sort_index(ascending=False).groupby(level="method").cummax() for v in (per, se))
    return [{"method": str(k[0]), "keep_ratio": float(k[1]), "loss_delta": max(float(envelope[k]), 0.0),
             "measured_loss_delta": float(v), "loss_delta_se": float(se_envelope[k])} for k, v in per.items()]


def _token_trend(df: pd.DataFrame, steps_range: tuple[int, int] | None) -> tuple[float, str, dict]:
    """(relax factor for keep_ratio_end, curve, provenance) from the token redundancy trend."""
    metric = next((m for m in ("mergeable_frac", "neighbor_cosine") if (df["metric"] == m).any()), None)
    need = 1.0 - df[df["metric"] == metric].groupby("step")["value"].mean().sort_index()
    if metric is None or len(need) < 2:
        return 1.0, "constant", {"metric": metric, "reason": "fewer than two checkpoints; constant"}
    curve, fit = fit_decay(_progress(list(need.index), steps_range), list(need.values),
                           min_abs_rise=TOKEN_TREND_MIN_ABS_RISE)
    factor = 1.0 if curve == "constant" else float(need.iloc[-1] / need.iloc[0])
    return factor, curve, {"metric": metric, "need": list(need.values), "curve": curve,
                           "keep_ratio_end_factor": factor, **fit}


def _tokens(method: str | None, ratio: float, relax: float, curve: str) -> TokenSparsity | None:
    if method is None:
        return None
    end = round(min(1.0, ratio * relax), 4) if relax > 1.0 else ratio
    return TokenSparsity(method, ratio, end, curve if end != ratio else "constant")


def _interpolated(points: dict[float, tuple[float, float]], frac: float) -> tuple[float, float, list[float]] | None:
    """``(loss, se, [lo, hi])`` at kept fraction ``frac`` on the chord between its neighbours in
    ``points`` (``{kept fraction: (loss, se)}``); None below the harshest point."""
    if frac < min(points) - 1e-12:
        return None
    lo = max(f for f in points if f <= frac + 1e-12)
    hi = min(f for f in points if f >= lo and f >= frac - 1e-12)
    w = 0.0 if hi == lo else (hi - frac) / (hi - lo)  # the weight of the harsher point
    return (w * points[lo][0] + (1 - w) * points[hi][0], w * points[lo][1] + (1 - w) * points[hi][1],
            [round(lo, 4), round(hi, 4)])


def _ratio_grid(num_visual_tokens: int) -> list[float]:
    """Keep ratios a target search tries beside the measured ones: every uniform-pooled grid
    (``(k / side)^2``) on a square grid of tokens, else steps of 1/32."""
    side = math.isqrt(num_visual_tokens)
    if side * side == num_visual_tokens:
        return [(k / side) ** 2 for k in range(1, side)]
    return [i / 32 for i in range(1, 32)]


def _choose(options: list[dict], layer_model: _Layers | None, relax: float, curve: str,
            budget: Budget, cost_args: dict) -> dict:
    """Evaluate the token options (plus layer skipping) against the budget; return the best."""
    decay = "constant" if layer_model is None else layer_model.decay
    n_layers, n_visual = cost_args["num_layers"], cost_args["num_visual_tokens"]
    candidates = []

    def kept_frac(method: str, ratio: float) -> float:
        return _kept_visual(method, n_visual, ratio) / n_visual

    def add(kind: str, method: str | None, ratio: float, token_delta: float, between: list[float] | None,
            token_se: float = 0.0) -> None:
        tok = _tokens(method, ratio, relax, curve)
        cost = _cost(tok, decay, **cost_args)
        probs = [0.0] * n_layers
        if budget.target_speedup is not None:
            need = (cost.base - cost.dense / budget.target_speedup) / cost.fa
            if need > 0 and layer_model is not None:
                scale = layer_model.scale_for_total(min(need, layer_model.max_total))
                probs = [min(MAX_SKIP_PROB, math.ceil(p * 1e4) / 1e4) for p in layer_model.probs(scale)]
        elif layer_model is not None and layer_model.delta is not None:
            scale = layer_model.scale_for_loss(budget.max_loss_increase - token_delta)
            probs = [math.floor(p * 1e4) / 1e4 for p in layer_model.probs(scale)]
        total = sum(probs)
        layer_loss = 0.0 if total == 0 else (math.nan if layer_model is None else layer_model.loss(probs))
        layer_se = 0.0 if total == 0 or layer_model is None else layer_model.loss_se(probs)
        candidates.append({
            "kind": kind, "tokens": tok, "skip_prob": probs, "token_loss_delta": token_delta,
            "token_loss_se": token_se, "interpolated_between": between,
            "predicted_speedup": cost.speedup(total),
            "layer_loss": layer_loss, "layer_loss_se": layer_se,
            "unknown_layer_loss": total if math.isnan(layer_loss) else 0.0,
            "predicted_loss_increase": token_delta + (0.0 if math.isnan(layer_loss) else layer_loss),
            "predicted_loss_se": token_se + layer_se,
        })

    add("dense tokens", None, 1.0, 0.0, None)
    for opt in options:
        if budget.max_loss_increase is None or opt["loss_delta"] <= budget.max_loss_increase:
            add("measured token option", opt["method"], opt["keep_ratio"], opt["loss_delta"], None,
                opt.get("loss_delta_se", 0.0))
    tolerance = math.inf if budget.max_loss_increase is None else budget.max_loss_increase
    for method in sorted({o["method"] for o in options}):
        measured = {o["keep_ratio"]: o for o in options if o["method"] == method}
        # the probes' points by the fraction of tokens they kept (a pooled grid keeps k*k)
        points = {1.0: (0.0, 0.0)}
        for r in sorted(measured, reverse=True):
            points[kept_frac(method, r)] = (measured[r]["loss_delta"], measured[r].get("loss_delta_se", 0.0))

        def key(r: float) -> tuple:  # same kept tokens over the whole stage: the same option
            tok = _tokens(method, r, relax, curve)
            return _kept_visual(method, n_visual, r), tok.keep_ratio_end if relax > 1.0 else None

        ratio = None if budget.target_speedup is None else _ratio_for_target(
            method, min(measured), relax, curve, budget.target_speedup, cost_args)
        seen = {key(r) for r in measured}
        for r in ([] if ratio is None else [ratio]) + _ratio_grid(n_visual):  # and milder ones
            option = key(r)
            if r < max(ratio or 0.0, min(measured)) - 1e-12 or option[0] >= n_visual or option in seen:
                continue
            seen.add(option)
            frac = option[0] / n_visual
            # constant: the kept fraction itself, with enough decimals to keep the kept count
            r = round(frac, 4 + max(0, math.ceil(math.log10(n_visual)) - 3)) if relax <= 1.0 else r
            point = _interpolated(points, frac)
            # (a pooled grid can fall below the harshest measured ratio)
            if point is not None and point[0] <= tolerance:
                add("token ratio between measured ones", method, r, point[0], point[2], point[1])
    if budget.target_speedup is not None:
        target = budget.target_speedup
        met = [c for c in candidates if c["predicted_speedup"] >= target * (1 - 1e-9)]
        if met:
            best = _prefer_within_noise(met)
        else:
            best = max(candidates, key=lambda c: c["predicted_speedup"])
        best["target_met"] = bool(met)
    else:
        best = min(candidates, key=lambda c: (-round(c["predicted_speedup"], 9), c["predicted_loss_increase"]))
    best["candidates"] = len(candidates)
    return best


def _prefer_within_noise(met: list[dict]) -> dict:
    """The candidate to take among those reaching the target.

    Each method (``None``: dense tokens) is represented by its own lowest predicted loss, then
    smallest speedup (unknown layer loss ranks worse than any known loss). The lowest of those
    wins, unless others lie within ``TIE_Z`` standard errors of it (``sqrt(se_a^2 + se_b^2)``,
    each candidate's ``predicted_loss_se``): then the most preferred method among those ties
    (``METHOD_RANK``, then predicted loss). Only a method's best candidate is tested: a
    harsher ratio that ties only because its probe is noisier does not pull in the method's
    milder candidates when those are measured clearly worse. ``ties`` records how many
    methods tied (the lowest's own included).

    ``sqrt(se_a^2 + se_b^2)`` treats two candidates' probes as independent; they share the
    calibration samples, so their errors correlate and the margin is conservative (wider).
    """
    def method(c: dict) -> str | None:
        return c["tokens"].method if c["tokens"] else None

    def by_loss(c: dict) -> tuple:
        return c["predicted_loss_increase"], c["predicted_speedup"]

    known = min(c["unknown_layer_loss"] for c in met)
    pool = [c for c in met if c["unknown_layer_loss"] == known]
    lowest = min(pool, key=by_loss)
    per_method: dict = {}
    for c in sorted(pool, key=by_loss):
        per_method.setdefault(method(c), c)  # each method's own lowest predicted loss
    ties = [c for c in per_method.values() if c["predicted_loss_increase"] - lowest["predicted_loss_increase"]
            <= TIE_Z * math.hypot(c["predicted_loss_se"], lowest["predicted_loss_se"])]
    best = min(ties, key=lambda c: (METHOD_RANK.get(method(c), len(METHOD_RANK)), c["predicted_loss_increase"]))
    best["ties"] = len(ties)
    best["lowest_loss_option"] = {"method": method(lowest), "kind": lowest["kind"],
                                  "predicted_loss_increase": lowest["predicted_loss_increase"],
                                  "predicted_loss_se": lowest["predicted_loss_se"]}
    return best


def _ratio_for_target(method: str, lowest: float, relax: float, curve: str, target: float,
                      cost_args: dict) -> float | None:
    """Largest start keep ratio (floored to 1e-3, >= ``lowest``) whose tokens alone reach ``target``."""
    def speedup(r: float) -> float:
        return _cost(_tokens(method, r, relax, curve), "constant", **cost_args).speedup(0.0)

    if speedup(lowest) < target:
        return None
    lo, hi = lowest, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if speedup(mid) >= target else (lo, mid)
    return max(lowest, math.floor(lo * 1e3) / 1e3)
