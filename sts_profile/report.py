"""One self-contained HTML page that presents an analysis: plots, key numbers, schedule, notes.

    paths = write_plots(layers, tokens, cost, schedule, out / "plots", num_layers=8)
    write_report(out, layers=layers, tokens=tokens, cost=cost, schedule=schedule, plots=paths,
                 notes=["one checkpoint: trends need two or more"], checkpoints=checkpoints)

Images are referenced by paths relative to the page, so the output folder can be moved or
zipped as a whole. The page is written atomically (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from sts_profile.derive import frozen_stages
from sts_profile.plots import caption
from sts_train.configtools import atomic_write_text
from sts_train.schedule import Schedule

REPORT_NAME = "report.html"
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:90%}th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:90%;color:#444}pre{background:#f7f7f7;padding:1em;overflow-x:auto}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.3em 0}
"""

__all__ = ["REPORT_NAME", "frozen_stages", "frozen_notes", "key_numbers", "write_report"]


def frozen_notes(layers: pd.DataFrame | None) -> list[str]:
    """One note per stage whose layer statistics do not move across its checkpoints."""
    return [f"LLM frozen in stage {stage}: layer statistics cannot change across its checkpoints"
            for stage in frozen_stages(layers)]


def _stage_steps(*tables: pd.DataFrame | None) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for t in tables:
        if t is not None and not t.empty:
            for stage, step in t[["stage", "step"]].drop_duplicates().itertuples(index=False):
                out.setdefault(str(stage), set()).add(int(step))
    return {s: sorted(v) for s, v in sorted(out.items(), key=lambda kv: min(kv[1]))}


def key_numbers(layers: pd.DataFrame | None, tokens: pd.DataFrame | None, top: int = 3) -> dict[str, dict]:
    """Per stage: most/least redundant layers and the best token method per keep ratio.

    Redundancy ranks layers by ``skip_loss_delta`` (fallback ``block_influence``, token type
    ``all`` if measured), averaged over the stage's checkpoints: smallest = most redundant.
    The best token method per keep ratio has the smallest mean ``compress_loss_delta``; where
    the tables hold ``compress_loss_delta_se`` (``skip_loss_delta_se``), its mean over
    checkpoints is given beside the method (the layer).

    Returns:
        ``{stage: {"metric", "most_redundant": [(layer, value)], "least_redundant": [...],
        "layer_se": {layer: se}, "best_token_method": {keep_ratio: (method, value)},
        "best_token_method_se": {keep_ratio: se}}}``; the ``_se`` entries only with standard
        errors in the tables.
    """
    out: dict[str, dict] = {}
    for stage in _stage_steps(layers, tokens):
        entry: dict[str, Any] = {}
        if layers is not None and not layers.empty:
            df = layers[layers["stage"] == stage]
            for metric in ("skip_loss_delta", "block_influence"):
                m = df[df["metric"] == metric]
                if (m["token_type"] == "all").any():
                    m = m[m["token_type"] == "all"]
                if not m.empty:
                    mean = m.groupby("layer")["value"].mean().sort_values()
                    pairs = [(int(l), float(v)) for l, v in mean.items()]
                    entry.update(metric=metric, most_redundant=pairs[:top], least_redundant=pairs[::-1][:top])
                    se = df[df["metric"] == f"{metric}_se"].groupby("layer")["value"].mean()
                    if not se.empty:
                        entry["layer_se"] = {int(l): float(v) for l, v in se.items()}
                    break
        if tokens is not None and not tokens.empty:
            m = tokens[(tokens["stage"] == stage) & (tokens["metric"] == "compress_loss_delta")]
            if not m.empty:
                mean = m.groupby(["keep_ratio", "method"])["value"].mean()
                entry["best_token_method"] = {
                    float(r): (str(g.idxmin()[1]), float(g.min())) for r, g in mean.groupby(level=0)}
                se = tokens[(tokens["stage"] == stage) & (tokens["metric"] == "compress_loss_delta_se")]
                se = se.groupby(["keep_ratio", "method"])["value"].mean()
                best_se = {r: float(se.get((r, m), math.nan)) for r, (m, _) in entry["best_token_method"].items()}
                if not se.empty:
                    entry["best_token_method_se"] = best_se
        out[stage] = entry
    return out


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _checkpoint_rows(checkpoints: Iterable, layers, tokens) -> list[dict]:
    rows = []
    for c in checkpoints or []:
        if dataclasses.is_dataclass(c) and not isinstance(c, type):
            c = dataclasses.asdict(c)
        rows.append({k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in c.items()}
                    if isinstance(c, dict) else {"checkpoint": str(c)})
    if rows:
        return rows
    frames = [t[["checkpoint", "step", "stage"]] for t in (layers, tokens) if t is not None and not t.empty]
    if not frames:
        return []
    table = pd.concat(frames).drop_duplicates().sort_values(["step", "checkpoint"])
    return [{"checkpoint": c, "step": int(s), "stage": g} for c, s, g in table.itertuples(index=False)]


def _key_numbers_html(numbers: dict[str, dict], schedule: Schedule | None) -> str:
    speedups = (schedule.source.get("predicted_speedup") or {}) if schedule is not None else {}
    rows = []
    for stage, entry in numbers.items():
        best, best_se = entry.get("best_token_method", {}), entry.get("best_token_method_se", {})
        layer_se = entry.get("layer_se", {})

        def noise(errors, key):
            return f" \u00b1 {errors[key]:.2g}" if math.isfinite(errors.get(key, math.nan)) else ""

        def layers_of(key):
            return ", ".join(f"{l} ({v:.3g}{noise(layer_se, l)})" for l, v in entry.get(key, [])) or "-"
        rows.append({
            "stage": stage, "layer metric": entry.get("metric", "-"),
            "most redundant layers": layers_of("most_redundant"),
            "least redundant layers": layers_of("least_redundant"),
            "best token method per keep ratio": "; ".join(
                f"{r:g}: {m} ({v:+.3g}{noise(best_se, r)})" for r, (m, v) in sorted(best.items(), reverse=True)) or "-",
            "predicted speedup": speedups.get(stage, "-"),
        })
    return _table(rows)


def write_report(out_dir: Path, *, layers: pd.DataFrame | None, tokens: pd.DataFrame | None,
                 cost: pd.DataFrame | None, schedule: Schedule | None, plots: dict[str, Path],
                 notes: list[str], checkpoints: list) -> Path:
    """Write ``out_dir/report.html``.

    Args:
        out_dir: the analysis output folder (the page goes here; plots may live below it).
        layers, tokens, cost: the profiler's tables (None or empty are tolerated).
        schedule: the derived schedule (embedded as YAML), or None.
        plots: ``{key: path}`` as returned by :func:`sts_profile.plots.write_plots`.
        notes: messages for the reader; frozen-LLM stages and single-checkpoint stages are
            detected and added here when not already present.
        checkpoints: what was analyzed (dicts, dataclasses or names); falls back to the tables.

    Returns:
        The path of the page.
    """
    out_dir = Path(out_dir)
    all_notes = list(dict.fromkeys(notes))
    for stage, note in zip(frozen_stages(layers), frozen_notes(layers)):
        if not any(f"LLM frozen in stage {q}{stage}{q}" in n for n in all_notes for q in ("", "'")):
            all_notes.append(note)
    for stage, steps in _stage_steps(layers, tokens).items():
        if len(steps) == 1:
            all_notes.append(f"stage {stage} has one checkpoint: trends across checkpoints need two or more")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>STS profile report</title>"
             f"<style>{_CSS}</style></head><body><h1>STS profile report</h1>"]
    if schedule is not None and schedule.source.get("version"):
        parts.append(f"<p>Written by {html.escape(str(schedule.source.get('tool', 'sts-profile')))}"
                     f" {html.escape(str(schedule.source['version']))}.</p>")
    parts.append("<h2>Notes</h2>" + ("".join(f"<div class='note'>{html.escape(n)}</div>" for n in all_notes)
                                     or "<p>none</p>"))
    parts.append("<h2>Key numbers</h2><p>Means over each stage's checkpoints (\u00b1 the mean of their "
                 "standard errors). The schedule ranks options by the largest delta over the checkpoints, "
                 "so the two can name different methods.</p>"
                 + _key_numbers_html(key_numbers(layers, tokens), schedule))
    parts.append("<h2>Checkpoints</h2>" + _table(_checkpoint_rows(checkpoints, layers, tokens)))
    parts.append("<h2>Plots</h2>")
    for key, path in plots.items():
        rel = Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
        parts.append(f"<figure id='{html.escape(key)}'><img src='{html.escape(rel)}' alt='{html.escape(key)}'>"
                     f"<figcaption>{html.escape(caption(key))}</figcaption></figure>")
    if not plots:
        parts.append("<p>No plots (no data to plot).</p>")
    if cost is not None and not cost.empty and "flops_fwd" in cost:
        totals = cost.groupby(["seq_len", "component"])["flops_fwd"].sum().reset_index()
        parts.append("<h2>Cost</h2>" + _table(totals.to_dict("records")))
    parts.append("<h2>Schedule</h2>")
    if schedule is None:
        parts.append("<p>No schedule was derived.</p>")
    else:
        text = yaml.safe_dump(schedule.to_dict(), sort_keys=False, allow_unicode=True)
        parts.append(f"<pre>{html.escape(text)}</pre>")
    parts.append("</body></html>\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out_dir / REPORT_NAME, "\n".join(parts))
