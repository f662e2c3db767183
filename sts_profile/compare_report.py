"""The recipe's comparison report: dense vs schedule-driven training, side by side.

Layout of ``reports/<name>/``::

    index.html          the page: timing, FLOPs, quality, redundancy plots, the schedule
    summary.json        every number on the page
    schedule.yaml       the schedule the sparse run used
    wall_time.png       wall time per stage, dense vs sparse
    plots/*.png         redundancy plots copied from the analysis
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path



def _wall_time_plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(result["stages"])
    dense = [result["stages"][s]["dense_wall_s"] for s in stages]
    sparse = [result["stages"][s]["sparse_wall_s"] for s in stages]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(stages))
    ax.bar([i - 0.2 for i in x], dense, 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], sparse, 0.4, label="sparse (schedule)")
    ax.set_xticks(list(x), stages)
    ax.set_ylabel("training wall time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x, pct=False) -> str:
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}" if abs(x) < 100 else f"{x:.0f}"
    return html.escape(str(x))


REPORT_ENTRIES = frozenset({"plots", "schedule.yaml", "wall_time.png", "summary.json", "index.html"})  # written below


def write_comparison(out: Path, result: dict, *, analysis_dir: Path, schedule: Path) -> Path:
    """Write the report folder atomically (built in a temp folder, then renamed).

    Returns:
        Path of ``index.html``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    plots = tmp / "plots"
    plots.mkdir()
    copied = []
    for png in sorted(Path(analysis_dir).rglob("*.png")):
        shutil.copy2(png, plots / png.name)
        copied.append(png.name)
    shutil.copy2(schedule, tmp / "schedule.yaml")
    _wall_time_plot(result, tmp / "wall_time.png")
    (tmp / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    e2e, q = result["end_to_end"], result["quality"]
    stage_rows = "".join(
        f"<tr><td>{s}</td><td>{_fmt(r['dense_wall_s'])}</td><td>{_fmt(r['sparse_wall_s'])}</td>"
        f"<td>{r['speedup']:.2f}x</td><td>{_fmt(r['flops_saved_frac'], True)}</td>"
        f"<td>{_fmt(r['visual_tokens_saved_frac'], True)}</td><td>{r['layer_skips']}</td></tr>"
        for s, r in result["stages"].items()
    )
    quality_rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(q[name]['eval_loss_captions'])}</td><td>{_fmt(q[name]['eval_loss_qa'])}</td>"
        f"<td>{_fmt(q[name]['answer_accuracy'], True)}</td><td>{q[name]['answered']}</td></tr>"
        for name in ("dense", "sparse")
    )
    if "prior" in q:  # the guesser that ignores the image: no losses
        quality_rows += (f"<tr><td>answer prior (no model)</td><td></td><td></td>"
                         f"<td>{_fmt(q['prior']['answer_accuracy'], True)}</td><td>{q['prior']['answered']}</td></tr>")
    diff = q.get("accuracy_difference")
    diff_line = "" if not diff or not diff["paired"] else (
        f"<p>Sparse minus dense, paired by answer: <b>{100 * diff['difference']:+.1f} points</b> "
        f"(standard error {100 * diff['stderr']:.1f} points over {diff['paired']} answers; the answers about one "
        f"image are correlated, so the true uncertainty is larger).</p>")
    runs = [name for name in ("dense", "sparse", "prior") if name in q]
    kinds = sorted({k for name in runs for k in q[name].get("per_kind", {})})
    kind_rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{_fmt(q[name]['per_kind'][k], True) if k in q[name].get('per_kind', {}) else ''}</td>"
                  for name in runs) + "</tr>"
        for k in kinds
    )
    phases = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in result["phases_s"].items())
    figures = "".join(
        f'<figure><img src="plots/{html.escape(n)}" width="560"><figcaption>{html.escape(n)}</figcaption></figure>'
        for n in copied
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>STS recipe: dense vs stage-aware sparse</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
td:first-child{{text-align:left}}figure{{display:inline-block;margin:6px}}pre{{background:#f4f4f4;padding:8px}}</style>
</head><body>
<h1>Dense vs stage-aware sparse training</h1>
<p>Same data, same initial weights, same steps. The sparse run follows <code>schedule.yaml</code>, derived by
<code>sts-profile analyze</code> from the dense run's checkpoints. Evaluation is dense for both.</p>
<h2>End to end</h2>
<p><b>{e2e['speedup']:.2f}x</b> faster training wall time ({_fmt(e2e['dense_wall_s'])} s dense vs
{_fmt(e2e['sparse_wall_s'])} s sparse); analytic LLM FLOPs saved: {_fmt(e2e['flops_saved_frac'], True)}.</p>
<img src="wall_time.png" width="420">
<h2>Per stage</h2>
<table><tr><th>stage</th><th>dense s</th><th>sparse s</th><th>speedup</th><th>FLOPs saved</th>
<th>visual tokens saved</th><th>layer skips</th></tr>{stage_rows}</table>
<h2>Quality (held-out, dense evaluation)</h2>
<table><tr><th>run</th><th>caption loss</th><th>QA loss</th><th>answer accuracy</th><th>answered</th></tr>
{quality_rows}</table>
{diff_line}
<p>Every assistant turn is scored: given the conversation before it, does greedy decoding reproduce the answer
exactly?</p>
<p>Answer accuracy per question kind (the answer prior answers each kind's most common training answer,
without the image: a model at that level has not learned to read the image).</p>
<table><tr><th>kind</th>{"".join(f"<th>{n}</th>" for n in runs)}</tr>{kind_rows}</table>
<h2>Redundancy measured on the dense run</h2>{figures}
<h2>Schedule</h2><pre>{html.escape((tmp / 'schedule.yaml').read_text())}</pre>
<h2>Phases (wall time, s)</h2><table>{phases}</table>
</body></html>
"""
    (tmp / "index.html").write_text(page)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out / "index.html"

