"""Speed and memory of `sts-profile analyze`: hook overhead, seconds per checkpoint, peak RSS.

    .venv/bin/python bench/profile_speed.py [--size demo --counts 1,2,4 --samples 4 --json out.json]

Three measurements on factory LLaVA models (random weights) and real shapes data:

1. Overhead of the passive collection (``--size``): over the same collated batches, a plain
   ``model(**batch)`` under no_grad against ``PassiveCollector.forward`` (hooks on every decoder
   layer and the projector), once with the text->visual attention recomputed at every layer
   (the analyze default) and once with no attention layers. Modes are interleaved per round in
   a rotated order (the machine is shared); warm-up rounds are dropped. Reported: median time
   per mode and the median over rounds of mode_time / plain_time (target <= 1.25).
2. Seconds per checkpoint of a full ``run_analysis`` (passive + probes + tables, plots, report)
   on ``checkpoint-N/`` runs of checkpoints saved with ``save_model_folder`` under different
   seeds (``--mem-size``): wall / N, each checkpoint's own time (the first also times the
   cost table) and the marginal seconds per added checkpoint (slope of wall over N).
3. Peak memory as the run grows: each run of ``--counts`` checkpoints is analyzed in a fresh
   subprocess that reports its own VmHWM (peak RSS) from /proc/self/status; the slope in MB per
   checkpoint should be ~0 (target: flat, i.e. far below one model's weights per checkpoint).

Progress goes to stderr, the JSON to stdout (and to ``--json``, written atomically; an
existing file needs ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchio import add_output_options, check_output_options, emit

TARGET_OVERHEAD = 1.25  # passive forward / plain forward
FLAT_FRACTION_OF_MODEL = 0.5  # flat: peak RSS grows by < half a model's weights per checkpoint
CHILD_MARK = "PROFILE_SPEED_CHILD "


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def proc_status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM`` = peak RSS, ``VmRSS``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def make_data(folder: Path, size: str, samples: int) -> tuple[Path, Path]:
    """A shapes instruction split with at least ``samples`` image samples: (json, image folder);
    its image paths (``images/x.png``) are relative to the JSON's folder."""
    from sts_train.factory import get_size
    from sts_train.shapes import generate_shapes

    paths = generate_shapes(folder, n_alignment=0, n_instruction=samples + samples // 19 + 1, n_eval=0,
                            image_size_px=get_size(size).image_size_px, seed=0)  # every 20th is text-only
    return paths["instruction"], paths["instruction"].parent


def make_runs(folder: Path, size: str, counts: list[int]) -> dict[int, Path]:
    """One ``run-N/checkpoint-K/`` folder per count; checkpoints are saved once (seed = index)
    and linked into each run, so run N holds the first N of them."""
    from sts_train.factory import save_model_folder

    saved = [save_model_folder(size, folder / "models" / f"seed{i}", seed=i) for i in range(max(counts))]
    runs = {}
    for n in counts:
        run = folder / f"run-{n}"
        run.mkdir(parents=True)
        for i in range(n):
            (run / f"checkpoint-{10 * (i + 1)}").symlink_to(saved[i].resolve(), target_is_directory=True)
        runs[n] = run
    return runs


def measure_overhead(args, data_json: Path, images: Path) -> dict:
    """Interleaved plain vs hooked forwards of the same batches (in this process)."""
    import torch

    from sts_profile.collect import PassiveCollector
    from sts_train.adapters import model_parts
    from sts_train.data import LlavaCollator, LlavaDataset
    from sts_train.factory import build_model, build_processor

    model, processor = build_model(args.size, seed=0).eval(), build_processor(args.size)
    parts = model_parts(model)
    data = LlavaDataset(data_json, images, processor, num_image_tokens=parts.num_visual_tokens)
    picked = [i for i in range(len(data)) if "image" in data.samples[i]][: args.batch_size * args.batches]
    collate = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)
    batches = [collate([data[i] for i in picked[k:k + args.batch_size]])
               for k in range(0, len(picked), args.batch_size)]
    attention = {"passive_all_attention_layers": None, "passive_no_attention_layers": ()}

    def timed(mode: str, batch: dict) -> float:
        if mode == "plain":
            start = time.perf_counter()
            with torch.no_grad():
                model(**batch)
            return time.perf_counter() - start
        collector = PassiveCollector(model, parts, attention_layers=attention[mode])
        try:
            start = time.perf_counter()
            collector.forward(batch)
            return time.perf_counter() - start
        finally:
            collector.remove()

    modes = ["plain", *attention]
    rounds = []
    for r in range(args.warmup + args.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        batch = batches[r % len(batches)]
        times = {mode: timed(mode, batch) for mode in order}
        if r >= args.warmup:
            rounds.append(times)
        log(f"overhead {'warmup' if r < args.warmup else 'round'} {r}: "
            + "  ".join(f"{m} {times[m]:.3f}s" for m in modes))
    out = {"size": args.size, "batch_size": args.batch_size, "batches_cycled": len(batches),
           "seq_len_padded": [b["input_ids"].shape[1] for b in batches], "rounds": args.rounds,
           "warmup": args.warmup, "decoder_layers": parts.num_layers,
           "plain_median_s": statistics.median(rd["plain"] for rd in rounds)}
    for mode in attention:
        ratios = [rd[mode] / rd["plain"] for rd in rounds]
        out[mode] = {"median_s": statistics.median(rd[mode] for rd in rounds),
                     "overhead_ratio": statistics.median(ratios),
                     "ratio_min_max_over_rounds": [min(ratios), max(ratios)],
                     # least-contended estimate: a loaded machine only ever adds time
                     "ratio_of_min_times": min(rd[mode] for rd in rounds) / min(rd["plain"] for rd in rounds)}
    return out


def child_main(spec: dict) -> None:
    """Run one analysis in this (fresh) process; print wall, per-checkpoint times and VmHWM."""
    import torch

    from sts_profile import runner
    from sts_profile.analysis import AnalyzeConfig, run_analysis

    torch.set_num_threads(spec["threads"])
    rss_after_import_mb = proc_status_mb("VmRSS")
    per_checkpoint_s, hwm_after_checkpoint_mb = [], []
    inner = runner.checkpoint_result

    def timed_result(plan, index, cache_dir):
        start = time.perf_counter()
        result = inner(plan, index, cache_dir)
        per_checkpoint_s.append(time.perf_counter() - start)
        hwm_after_checkpoint_mb.append(proc_status_mb("VmHWM"))  # the peak so far
        return result

    runner.checkpoint_result = timed_result  # run_analysis looks it up on the module
    config = AnalyzeConfig(ckpt_dir=spec["run"], out_dir=spec["out"], data_json=spec["data_json"],
                           images=spec["images"], num_samples=spec["samples"], batch_size=spec["batch_size"])
    start = time.perf_counter()
    run_analysis(config)
    wall_s = time.perf_counter() - start
    print(CHILD_MARK + json.dumps({"wall_s": wall_s, "per_checkpoint_s": per_checkpoint_s,
                                   "peak_rss_mb": proc_status_mb("VmHWM"),
                                   "hwm_after_checkpoint_mb": hwm_after_checkpoint_mb,
                                   "rss_after_import_mb": rss_after_import_mb}), flush=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"analysis subprocess failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with a single point)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def measure_runs(args, tmp: Path) -> dict:
    """Analyze each run of ``--counts`` checkpoints in a fresh subprocess."""
    from sts_train.factory import build_model

    data_json, images = make_data(tmp / "mem-data", args.mem_size, args.samples)
    runs = make_runs(tmp / "runs", args.mem_size, args.counts)
    model = build_model(args.mem_size)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    per_count = {}
    for n, run in runs.items():
        log(f"analysis of {n} checkpoint(s) in a subprocess ...")
        spec = {"run": str(run), "out": str(tmp / f"out-{n}"), "data_json": str(data_json),
                "images": str(images), "samples": args.samples, "batch_size": args.batch_size,
                "threads": args.threads}
        per_count[n] = run_child(spec)
        log(f"  {n} checkpoint(s): {per_count[n]['wall_s']:.1f}s, peak RSS {per_count[n]['peak_rss_mb']:.0f} MB")
    counts = sorted(per_count)
    largest = per_count[counts[-1]]
    rss_slope = slope(counts, [per_count[n]["peak_rss_mb"] for n in counts])
    return {
        "seconds_per_checkpoint": {
            "size": args.mem_size, "checkpoints": counts[-1], "samples": args.samples,
            "batch_size": args.batch_size, "wall_s": largest["wall_s"],
            "wall_over_n_s": largest["wall_s"] / counts[-1],
            "per_checkpoint_s": largest["per_checkpoint_s"],  # the first also times the cost table
            "median_after_first_s": (statistics.median(largest["per_checkpoint_s"][1:])
                                     if counts[-1] > 1 else None),
            "outside_checkpoints_s": largest["wall_s"] - sum(largest["per_checkpoint_s"]),
            "marginal_s_per_added_checkpoint": slope(counts, [per_count[n]["wall_s"] for n in counts]),
        },
        "peak_memory": {
            "size": args.mem_size, "model_weights_mb": weights_mb,
            "peak_rss_mb_by_checkpoints": {str(n): per_count[n]["peak_rss_mb"] for n in counts},
            # the peak when the last checkpoint is done, before tables, plots and report are written
            "peak_rss_mb_checkpoint_loop_by_checkpoints":
                {str(n): per_count[n]["hwm_after_checkpoint_mb"][-1] for n in counts},
            "rss_after_import_mb_by_checkpoints": {str(n): per_count[n]["rss_after_import_mb"] for n in counts},
            f"hwm_after_each_checkpoint_mb_of_{counts[-1]}": largest["hwm_after_checkpoint_mb"],
            "slope_mb_per_checkpoint": rss_slope,
            "slope_mb_per_checkpoint_checkpoint_loop":
                slope(counts, [per_count[n]["hwm_after_checkpoint_mb"][-1] for n in counts]),
            "flat_if_slope_below_mb": FLAT_FRACTION_OF_MODEL * weights_mb,
            "flat": len(counts) > 1 and rss_slope < FLAT_FRACTION_OF_MODEL * weights_mb,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="demo", help="factory size of the overhead measurement")
    ap.add_argument("--mem-size", default=None, help="factory size of the analysis runs (default: --size)")
    ap.add_argument("--rounds", type=int, default=10, help="measured overhead rounds (each runs every mode)")
    ap.add_argument("--warmup", type=int, default=2, help="overhead rounds run first and discarded")
    ap.add_argument("--batches", type=int, default=2, help="distinct batches cycled in the overhead rounds")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples of each analysis")
    ap.add_argument("--counts", default="1,2,4,8", help="checkpoint counts of the analysis runs")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    add_output_options(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one analysis subprocess
    args = ap.parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    try:
        args.counts = sorted({int(c) for c in args.counts.split(",")})
    except ValueError:
        ap.error(f"--counts {args.counts!r}: use comma-separated integers, e.g. 1,2,4")
    if min(args.counts) < 1 or min(args.rounds, args.batches, args.batch_size, args.samples, args.threads) < 1 \
            or args.warmup < 0:
        ap.error("--counts, --rounds, --batches, --batch-size, --samples, --threads must be >= 1, --warmup >= 0")
    check_output_options(ap, args)
    args.mem_size = args.mem_size or args.size

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sts-bench-profile-") as tmp:
        data_json, images = make_data(Path(tmp) / "data", args.size, args.batch_size * args.batches)
        overhead = measure_overhead(args, data_json, images)
        runs = measure_runs(args, Path(tmp))
    worst = max(overhead[m]["overhead_ratio"] for m in ("passive_all_attention_layers",
                                                         "passive_no_attention_layers"))
    out = {
        "overhead": overhead,
        **runs,
        "targets": {
            "overhead_ratio_le": TARGET_OVERHEAD,
            "overhead_met_all_attention_layers":
                overhead["passive_all_attention_layers"]["overhead_ratio"] <= TARGET_OVERHEAD,
            "overhead_met_no_attention_layers":
                overhead["passive_no_attention_layers"]["overhead_ratio"] <= TARGET_OVERHEAD,
            "overhead_worst": worst,
            "peak_memory_flat": runs["peak_memory"]["flat"],
        },
        "config": {
            "size": args.size, "mem_size": args.mem_size, "counts": args.counts, "samples": args.samples,
            "batch_size": args.batch_size, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": args.threads,
            "cpu_count": os.cpu_count(), "loadavg_1m_start": load_start,
            "loadavg_1m_end": os.getloadavg()[0], "total_s": time.perf_counter() - start,
            "analysis": "run_analysis defaults otherwise: probes on, attention at every layer, float32, cpu",
        },
    }
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
