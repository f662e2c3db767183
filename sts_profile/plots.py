"""Plots of the profiler's tables: one PNG per view (matplotlib, Agg), written atomically.

    paths = write_plots(layers, tokens, cost, schedule, Path("analysis/plots"), num_layers=8)

Views (each skipped when its data is absent; only written files are returned):

* ``redundancy_<metric>``: one curve per layer across checkpoints (x = step), one panel per
  token type, stage boundaries as dashed lines, frozen-LLM stages shaded.
* ``heatmap_<metric>``: layer x checkpoint, one panel per token type.
* ``token_keep_ratio``: loss change vs visual-token keep ratio per method (mean over a stage's
  checkpoints, bars from min to max), one panel per stage.
* ``token_redundancy``: projector-level token redundancy and text-to-visual attention over steps.
* ``schedule_preview``: skip probability per layer and keep ratio over progress, per stage.
* ``cost_per_layer``: forward FLOPs and measured time per layer (largest measured seq_len).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from sts_profile.derive import frozen_stages
from sts_train.schedule import Schedule

LAYER_METRICS = ("block_influence", "angular_distance", "relative_update_norm", "skip_loss_delta", "skip_kl")
TOKEN_TYPES = ("visual", "text", "all")
TOKEN_TREND_METRICS = ("neighbor_cosine", "mergeable_frac", "text_to_visual_attention",
                       "visual_tokens_for_50pct_mass", "visual_tokens_for_90pct_mass")
METRIC_LABELS = {
    "block_influence": "block influence 1 - cos(h_in, h_out)",
    "angular_distance": "angular distance arccos(cos)/pi",
    "relative_update_norm": "relative update norm |h_out - h_in| / |h_in|",
    "skip_loss_delta": "loss increase when the layer is skipped",
    "skip_kl": "KL of the output distribution when the layer is skipped",
}
CAPTIONS = {
    "redundancy": "{label} per decoder layer across checkpoints (one curve per layer). Dashed lines"
                  " mark stage boundaries; shaded stages trained with a frozen LLM. Low values mean"
                  " a redundant layer.",
    "heatmap": "{label}: layer x checkpoint (checkpoints in step order).",
    "token_keep_ratio": "Loss change when visual tokens are compressed to a keep ratio, per method:"
                        " mean over the stage's checkpoints, bars from min to max.",
    "token_redundancy": "Visual-token redundancy at the projector output (neighbour cosine,"
                        " mergeable fraction per threshold) and text-to-visual attention over steps.",
    "schedule_preview": "The derived schedule: skip probability per layer and visual-token keep ratio"
                        " over each stage's progress.",
    "cost_per_layer": "Forward FLOPs (analytic) and measured forward time per layer.",
}


def caption(key: str) -> str:
    """Short caption of the plot called ``key`` (e.g. ``redundancy_block_influence``)."""
    for prefix in ("redundancy", "heatmap"):
        if key.startswith(prefix + "_"):
            metric = key[len(prefix) + 1:]
            return CAPTIONS[prefix].format(label=METRIC_LABELS.get(metric, metric).capitalize())
    return CAPTIONS.get(key, key.replace("_", " "))


def _save(fig, path: Path) -> Path:
    """Save ``fig`` as PNG through a temp file in the same folder and a rename; close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _stage_spans(*tables: pd.DataFrame | None) -> list[tuple[str, int, int]]:
    """``(stage, first step, last step)`` in step order."""
    frames = [t[["stage", "step"]] for t in tables if t is not None and not t.empty]
    if not frames:
        return []
    spans = pd.concat(frames).groupby("stage")["step"].agg(["min", "max"]).sort_values("min")
    return [(str(s), int(r["min"]), int(r["max"])) for s, r in spans.iterrows()]


def _mark_stages(ax, spans, frozen) -> None:
    for i, (stage, lo, hi) in enumerate(spans):
        if i:
            ax.axvline(0.5 * (spans[i - 1][2] + lo), color="0.3", ls="--", lw=1)
        if stage in frozen:
            ax.axvspan(lo, hi if hi > lo else lo + 1, color="0.85", alpha=0.5, lw=0)
        ax.text(lo, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="0.3")


def _layer_colors(num_layers: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(l / max(num_layers - 1, 1)) for l in range(num_layers)]


def _redundancy(layers, metric, num_layers, spans, frozen, path) -> Path | None:
    import matplotlib.pyplot as plt

    df = layers[layers["metric"] == metric]
    types = [t for t in TOKEN_TYPES if (df["token_type"] == t).any()]
    if not types:
        return None
    colors = _layer_colors(num_layers)
    fig, axes = plt.subplots(1, len(types), figsize=(5 * len(types), 3.6), squeeze=False, sharey=True)
    for ax, token_type in zip(axes[0], types):
        table = df[df["token_type"] == token_type].groupby(["step", "layer"])["value"].mean().unstack("layer")
        for layer in table.columns:
            ax.plot(table.index, table[layer], marker="o", ms=3, color=colors[int(layer) % len(colors)],
                    label=f"layer {int(layer)}")
        _mark_stages(ax, spans, frozen)
        ax.set(title=f"{token_type} tokens", xlabel="step")
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(METRIC_LABELS.get(metric, metric), fontsize=10)
    return _save(fig, path)


def _heatmap(layers, metric, path) -> Path | None:
    import matplotlib.pyplot as plt

    df = layers[layers["metric"] == metric]
    types = [t for t in TOKEN_TYPES if (df["token_type"] == t).any()]
    if not types:
        return None
    fig, axes = plt.subplots(1, len(types), figsize=(4.5 * len(types), 3.8), squeeze=False)
    for ax, token_type in zip(axes[0], types):
        sub = df[df["token_type"] == token_type]
        table = sub.groupby(["layer", "step"])["value"].mean().unstack("step").sort_index()
        stage_of = sub.groupby("step")["stage"].first()
        image = ax.imshow(table.to_numpy(float), aspect="auto", origin="lower", cmap="magma")
        ax.set_xticks(range(len(table.columns)),
                      [f"{s}\n{stage_of[s][:5]}" for s in table.columns], fontsize=7)
        ax.set_yticks(range(len(table.index)), [str(int(l)) for l in table.index], fontsize=7)
        ax.set(title=f"{token_type} tokens", xlabel="checkpoint step")
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[0][0].set_ylabel("layer")
    fig.suptitle(METRIC_LABELS.get(metric, metric), fontsize=10)
    return _save(fig, path)


def _token_keep_ratio(tokens, schedule, path) -> Path | None:
    import matplotlib.pyplot as plt

    df = tokens[(tokens["metric"] == "compress_loss_delta") & tokens["keep_ratio"].notna()]
    if df.empty:
        return None
    stages = [s for s, *_ in _stage_spans(df)]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.6), squeeze=False)
    tolerance = (schedule.source.get("budget") or {}).get("max_loss_increase") if schedule else None
    for ax, stage in zip(axes[0], stages):
        sub = df[df["stage"] == stage]
        for method, m in sub.groupby("method"):
            per = m.groupby(["keep_ratio", "step"])["value"].mean().groupby("keep_ratio").agg(["mean", "min", "max"])
            err = np.vstack([per["mean"] - per["min"], per["max"] - per["mean"]])
            ax.errorbar(per.index, per["mean"], yerr=err, marker="o", ms=4, capsize=3, label=method)
        ax.axhline(0.0, color="0.5", lw=0.8)
        if tolerance is not None:
            ax.axhline(tolerance, color="tab:red", ls=":", lw=1, label="tolerance")
        ratios = sorted(sub["keep_ratio"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set(title=stage, xlabel="visual-token keep ratio", ylabel="loss change")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _token_redundancy(tokens, spans, frozen, path) -> Path | None:
    import matplotlib.pyplot as plt

    metrics = [m for m in TOKEN_TREND_METRICS if (tokens["metric"] == m).any()]
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        sub = tokens[tokens["metric"] == metric]
        by = "threshold" if sub["threshold"].notna().any() else "layer"
        for key, m in sub.groupby(by):
            series = m.groupby("step")["value"].mean()
            label = f"threshold {key:g}" if by == "threshold" else ("projector" if key < 0 else f"layer {int(key)}")
            ax.plot(series.index, series.values, marker="o", ms=3, label=label)
        _mark_stages(ax, spans, ())
        ax.set(title=metric.replace("_", " "), xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _schedule_preview(schedule: Schedule, num_layers, path) -> Path:
    import matplotlib.pyplot as plt

    x = np.linspace(0.0, 1.0, 101)
    colors = _layer_colors(num_layers)
    n = len(schedule.stages)
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.8 * n), squeeze=False)
    for (ax_l, ax_t), stage in zip(axes, schedule.stages):
        if stage.layers is None:
            ax_l.text(0.5, 0.5, "no layer skipping", ha="center", va="center", transform=ax_l.transAxes)
        else:
            probs = np.array([stage.layers.skip_prob_at(v, num_layers) for v in x])
            for layer in range(num_layers):
                ax_l.plot(x, probs[:, layer], color=colors[layer], label=f"layer {layer}")
            ax_l.legend(fontsize=6, ncol=2, loc="upper right")
        ax_l.set(title=f"{stage.name}: skip probability", xlabel="stage progress", ylim=(-0.02, 1.0))
        ratio = [1.0 if stage.tokens is None else stage.tokens.keep_ratio_at(v) for v in x]
        method = "dense" if stage.tokens is None else stage.tokens.method
        ax_t.plot(x, ratio, color="tab:orange")
        ax_t.set(title=f"{stage.name}: keep ratio ({method})", xlabel="stage progress", ylim=(0.0, 1.05))
    fig.tight_layout()
    return _save(fig, path)


def _cost(cost: pd.DataFrame, path) -> Path | None:
    import matplotlib.pyplot as plt

    quantities = [q for q in ("flops_fwd", "time_fwd_s") if q in cost and cost[q].notna().any()]
    if not quantities:
        return None
    seq_len = cost["seq_len"].max()
    sub = cost[cost["seq_len"] == seq_len]
    if (sub["component"] == "total").any():
        sub = sub[sub["component"] == "total"]
    fig, axes = plt.subplots(1, len(quantities), figsize=(5 * len(quantities), 3.4), squeeze=False)
    for ax, quantity in zip(axes[0], quantities):
        # Decoder layers stacked by component; parts outside the layers (layer < 0) by name.
        per_layer = sub[sub["layer"] >= 0]
        table = per_layer.groupby(["layer", "component"])[quantity].sum().unstack("component").fillna(0.0)
        bottom = np.zeros(len(table))
        for component in table.columns:
            ax.bar([str(int(l)) for l in table.index], table[component].to_numpy(), bottom=bottom,
                   label=str(component))
            bottom += table[component].to_numpy()
        other = sub[sub["layer"] < 0].groupby("component")[quantity].sum()
        if not other.empty:
            ax.bar([str(c) for c in other.index], other.to_numpy(), color="0.6", label="outside the layers")
            ax.tick_params(axis="x", labelrotation=45)
        ax.set(title=f"{quantity} (seq_len {int(seq_len)})", xlabel="decoder layer / part", ylabel=quantity)
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(layers: pd.DataFrame | None, tokens: pd.DataFrame | None, cost: pd.DataFrame | None,
                schedule: Schedule | None, out_dir: Path, num_layers: int) -> dict[str, Path]:
    """Write every plot whose data is present into ``out_dir`` (created if needed).

    Args:
        layers, tokens, cost: the profiler's tidy tables (None or empty skips their plots).
        schedule: the derived schedule for the preview (None skips it).
        out_dir: folder for the PNGs.
        num_layers: decoder layers in the model (schedule preview, colours).

    Returns:
        ``{plot key: path}`` of the files written, in a stable order.
    """
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has = {name: t is not None and not t.empty for name, t in (("layers", layers), ("tokens", tokens), ("cost", cost))}
    spans = _stage_spans(layers if has["layers"] else None, tokens if has["tokens"] else None)
    frozen = frozen_stages(layers) if has["layers"] else []
    jobs = []
    if has["layers"]:
        metrics = [m for m in LAYER_METRICS if (layers["metric"] == m).any()]
        metrics += sorted(set(layers["metric"]) - set(LAYER_METRICS))
        for metric in metrics:
            jobs.append((f"redundancy_{metric}",
                         lambda p, m=metric: _redundancy(layers, m, num_layers, spans, frozen, p)))
            jobs.append((f"heatmap_{metric}", lambda p, m=metric: _heatmap(layers, m, p)))
    if has["tokens"]:
        jobs.append(("token_keep_ratio", lambda p: _token_keep_ratio(tokens, schedule, p)))
        jobs.append(("token_redundancy", lambda p: _token_redundancy(tokens, spans, frozen, p)))
    if schedule is not None:
        jobs.append(("schedule_preview", lambda p: _schedule_preview(schedule, num_layers, p)))
    if has["cost"]:
        jobs.append(("cost_per_layer", lambda p: _cost(cost, p)))
    written = {}
    for key, job in jobs:
        path = job(out_dir / f"{key}.png")
        if path is not None:
            written[key] = path
    return written
