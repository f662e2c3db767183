"""Quality at equal compute: dense vs the paper's formula vs uniform-random vs the profiled schedule.

    python bench/schedule_quality.py --size small --seeds 0 1 --json bench/results_schedule_quality.json

Per seed (the seed sets the shapes data, the initial weights and the sparsity plans), four arms
train through both stages as the recipe does (alignment, then instruction tuning from its final
checkpoint; sts_profile.recipe.train_two_stages), from the same initial weights on the same data:

    dense    no sparsity
    paper    alignment: uniform pooling at keep ratio r; instruction: LDS policy paper, alpha
             free, eps 0.2, alpha*(1+eps) < 0.95 (plus uniform pooling when layers cannot reach
             the budget: said in the output)
    uniform  alignment: the same pooling at r; instruction: every layer but first/last skipped
             with one constant probability p <= 0.9 (plus pooling when that cannot reach it)
    profile  run_analysis on the dense arm's run with --target-speedup; its schedule.yaml

Equal compute: the profile schedule is derived first; its predicted LLM FLOPs per stage are the
dense arm's measured FLOPs divided by sts_profile.derive.predicted_speedup, at each stage's
typical text length as the trainer counts it (rows padded per batch: the length that reproduces
the dense run's FLOPs; the profiler's own text_len is the unpadded median) and the model facts
of the analysis manifest. r is the pooled grid closest to the profile arm's alignment FLOPs
(uniform pooling on an NxN grid only keeps k*k tokens); alpha and p are then bisected so that
the whole run (both stages) matches the profile arm's predicted FLOPs. The FLOPs the runs
actually spent (sts_summary.json: random skips, per-batch padding) are reported beside the
prediction. Every arm is evaluated densely on the held-out splits (evaluate_run).

Wall time is the trainers' wall_time_s summed over both stages (the profile arm's dense run and
analysis are not in it), and, robust to the shared machine's contention spikes, steps x median
step time (sts_log.jsonl). Each arm also records its training loss at every logging step
(``train_loss_curve``: each point the mean since the one before), and a third table gives each
arm's mean training loss over the instruction stage (when every seed has curves; how early an
arm leaves a loss plateau shows there). Progress goes to stderr; the JSON and the Markdown
tables to stdout.
``--extend results.json`` adds seeds to an earlier result with the same settings (size, target,
steps): its per-seed results are kept, only the new seeds run, the summary covers all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchio import (
    add_extend_option, add_output_options, check_output_options, load_earlier, merge_earlier, over_seeds,
)
from sts_train.configtools import atomic_write_text

ARMS = ("dense", "paper", "uniform", "profile")
STAGES = ("alignment", "instruction")
PAPER_EPS, PAPER_CAP, UNIFORM_CAP = 0.2, 0.95, 0.9  # paper: alpha*(1+eps) < 0.95
TARGET_SPEEDUP_E2E, TARGET_ACC_POINTS = 1.67, 1.0
PRESETS = {  # size -> RecipeConfig overrides (test: the recipe's test_size)
    "small": dict(n_alignment=1200, n_instruction=2000, n_eval=200, alignment_steps=400,
                  instruction_steps=1800, checkpoints_per_stage=3, profile_samples=8),
}


def stage_flops(schedule, stage: str, dense_flops: float, facts: dict) -> float:
    """Predicted LLM FLOPs of ``stage``: the dense arm's measured FLOPs / predicted speedup."""
    from sts_profile.derive import predicted_speedup

    return dense_flops / predicted_speedup(schedule, stage=stage, **facts[stage])


def padded_text_len(summary: dict, stage: str, batch_size: int, facts: dict) -> int:
    """Text tokens per row that reproduce the dense run's FLOPs as the trainer counts them
    (every row at its batch's padded length): the "typical" text length of ``stage``."""
    from sts_train.flops import llm_step_flops

    per_step = summary["flops_dense"] / summary["global_step"]
    lo, hi = 1, 1 << 16  # smallest total length whose step FLOPs reach the measured ones
    while lo < hi:
        mid = (lo + hi) // 2
        flops = llm_step_flops([mid] * batch_size, facts["dims"], num_layers=facts["num_layers"],
                               llm_trainable=stage == "instruction")
        lo, hi = (mid + 1, hi) if flops < per_step else (lo, mid)
    return max(0, lo - facts["num_visual_tokens"])


def median_step_time_s(run_dir: Path) -> float:
    """Steps x median step time (sts_log.jsonl): wall time without the contention spikes."""
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "sts_log.jsonl").read_text().splitlines()]
    return len(times) * statistics.median(times)


def train_loss_curve(run_dir: Path) -> list[list[float]]:
    """``[step, training loss]`` at each logging step (the final checkpoint's trainer_state.json)."""
    from sts_profile.recipe import final_checkpoint

    history = json.loads((final_checkpoint(run_dir) / "trainer_state.json").read_text())["log_history"]
    return [[e["step"], float(e["loss"])] for e in history if "loss" in e]


def grid_ratios(num_visual_tokens: int) -> list[float]:
    """Keep ratios that give each distinct uniform-pooled grid (k*k of an NxN grid), densest first."""
    side = math.isqrt(num_visual_tokens)
    return [(k / side) ** 2 for k in range(side, 0, -1)]


def bisect_down(fn, target: float, hi: float, iters: int = 50) -> float:
    """x in [0, hi] with fn(x) == target, for fn decreasing in x (clamped to the ends)."""
    if fn(0.0) <= target:
        return 0.0
    if fn(hi) >= target:
        return hi
    lo = 0.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def build(arm: str, num_layers: int, r_align: float, x: float, r_instr: float):
    """The schedule of arm ``paper`` (x = alpha) or ``uniform`` (x = p) at the given rates."""
    from sts_profile.derive import paper_schedule
    from sts_train.schedule import SCHEMA_VERSION, LayerSparsity, Schedule, Stage, TokenSparsity

    instr_tokens = TokenSparsity("uniform", r_instr) if r_instr < 1.0 else None
    source = {"tool": "bench/schedule_quality.py", "arm": arm, "keep_ratio_alignment": r_align,
              "keep_ratio_instruction": r_instr}
    if arm == "paper":
        sched = paper_schedule(alpha=x, eps=PAPER_EPS, provenance=source, keep_ratio=r_align)
        stages = tuple(replace(s, tokens=instr_tokens) if s.name == "instruction" else s for s in sched.stages)
        return Schedule(SCHEMA_VERSION, sched.source, stages)
    layers = None
    if x > 0:  # first/last: p 0 and never_skip; the rest one constant p
        layers = LayerSparsity("per_layer", skip_prob=(0.0,) + (x,) * (num_layers - 2) + (0.0,), decay="constant")
    return Schedule(SCHEMA_VERSION, {**source, "skip_prob": x},
                    (Stage("alignment", tokens=TokenSparsity("uniform", r_align)),
                     Stage("instruction", tokens=instr_tokens, layers=layers)))


def matched_schedules(profile, dense: dict, facts: dict) -> dict:
    """Schedules of arms paper and uniform whose predicted whole-run FLOPs match ``profile``'s."""
    target = {s: stage_flops(profile, s, dense[s]["flops"], facts) for s in STAGES}
    num_layers, grid = facts["alignment"]["num_layers"], grid_ratios(facts["alignment"]["num_visual_tokens"])
    out = {}
    for arm, cap in (("paper", PAPER_CAP / (1 + PAPER_EPS) - 1e-6), ("uniform", UNIFORM_CAP)):
        def flops(stage, r_align, x=0.0, r_instr=1.0):
            sched = build(arm, num_layers, r_align, x, r_instr)
            return stage_flops(sched, stage, dense[stage]["flops"], facts)

        r_align = min(grid, key=lambda r: abs(math.log(flops("alignment", r) / target["alignment"])))
        instr_target = sum(target.values()) - flops("alignment", r_align)
        # Layers alone if they can reach it; else the mildest pooling with which they can.
        r_instr = next((r for r in grid if flops("instruction", r_align, cap, r) <= instr_target), grid[-1])
        x = bisect_down(lambda v: flops("instruction", r_align, v, r_instr), instr_target, cap)
        sched = build(arm, num_layers, r_align, x, r_instr)
        predicted = {s: flops(s, r_align, x, r_instr) for s in STAGES}
        out[arm] = {"schedule": sched, "keep_ratio_alignment": r_align, "layer_param": x,
                    "layer_param_name": "alpha" if arm == "paper" else "skip_prob",
                    "keep_ratio_instruction": r_instr, "instruction_pooling_added": r_instr < 1.0,
                    "predicted_flops": predicted,
                    "predicted_mismatch": sum(predicted.values()) / sum(target.values()) - 1}
    out["profile"] = {"schedule": profile, "predicted_flops": target, "predicted_mismatch": 0.0}
    out["dense"] = {"predicted_flops": {s: dense[s]["flops"] for s in STAGES}}
    return out


def run_seed(args, seed: int, work: Path) -> dict:
    """Dense, analysis, three sparse arms and the dense evaluations of one seed."""
    from sts_profile.analysis import AnalyzeConfig, run_analysis
    from sts_profile.recipe import Phases, RecipeConfig, evaluate_run, recipe_data, test_size, train_two_stages
    from sts_train.evaluate import paired_difference
    from sts_train.flops import LayerDims
    from sts_train.schedule import dump_schedule, load_schedule

    cfg = RecipeConfig(size=args.size, seed=seed, target_speedup=args.target_speedup)
    cfg = test_size(cfg) if args.size == "test" else replace(cfg, **PRESETS.get(args.size, {}))
    steps = {k: v for k, v in (("alignment_steps", args.alignment_steps),
                               ("instruction_steps", args.instruction_steps)) if v is not None}
    cfg = replace(cfg, **steps)
    phases, home = Phases(), work / f"seed{seed}"
    data = phases.run("data", recipe_data, cfg, home / "data")
    load = {"dense": os.getloadavg()[0]}  # shared machine: contention shows in wall times
    summaries = {"dense": train_two_stages(cfg, data, home / "dense", phases, "dense")}
    analysis = phases.run("analyze", run_analysis, AnalyzeConfig(  # as the recipe calls it
        ckpt_dir=str(home / "dense"), out_dir=str(home / "analysis"), data_json=str(data["instruction_eval"]),
        images=str(data["images"].parent), num_samples=cfg.profile_samples, batch_size=4, seed=seed,
        target_speedup=cfg.target_speedup))
    manifest = json.loads((Path(analysis.out_dir) / "analysis.json").read_text())
    model = {"num_layers": manifest["num_layers"], "dims": LayerDims(**manifest["dims"]),
             "num_visual_tokens": manifest["num_visual_tokens"]}
    facts = {s: {**model, "text_len": padded_text_len(summaries["dense"][s], s, cfg.batch_size, model)}
             for s in STAGES}
    arms = matched_schedules(load_schedule(Path(analysis.out_dir) / "schedule.yaml"), summaries["dense"], facts)
    for arm in ("paper", "uniform", "profile"):
        path = dump_schedule(arms[arm]["schedule"], home / "schedules" / f"{arm}.yaml")
        load[arm] = os.getloadavg()[0]
        summaries[arm] = train_two_stages(cfg, data, home / arm, phases, arm, schedule=path)
    dense_flops = sum(summaries["dense"][s]["flops"] for s in STAGES)
    dense_wall = sum(summaries["dense"][s]["wall_time_s"] for s in STAGES)
    robust = {arm: sum(median_step_time_s(home / arm / t) for t in STAGES) for arm in ARMS}
    out, outcomes = {}, {}
    for arm in ARMS:  # dense first: the others are paired with it
        quality = phases.run(f"evaluate {arm}", evaluate_run, home / arm, data, cfg.eval_limit)
        outcomes[arm] = quality["outcomes"]
        vs_dense = paired_difference(outcomes["dense"], outcomes[arm])
        s = summaries[arm]
        info = {k: v for k, v in arms[arm].items() if k != "schedule"}
        out[arm] = {
            "flops_vs_dense": sum(s[t]["flops"] for t in STAGES) / dense_flops,
            "predicted_flops_vs_dense": sum(info["predicted_flops"].values()) / dense_flops,
            "wall_vs_dense": sum(s[t]["wall_time_s"] for t in STAGES) / dense_wall,
            "median_step_wall_vs_dense": robust[arm] / robust["dense"],
            "wall_time_s": {t: s[t]["wall_time_s"] for t in STAGES}, "flops": {t: s[t]["flops"] for t in STAGES},
            "loadavg_1m_at_start": load[arm], "answered": quality["answered"],
            **{k: quality[k] for k in ("eval_loss_qa", "answer_accuracy", "eval_loss_captions")},
            "accuracy_vs_dense": vs_dense["difference"], "accuracy_vs_dense_stderr": vs_dense["stderr"],
            "train_loss_curve": {t: train_loss_curve(home / arm / t) for t in STAGES},
            **info,
            "schedule": arms[arm]["schedule"].to_dict()["stages"] if arm != "dense" else None,
        }
    out["_seed"] = {"analyze_s": phases.times["analyze"], "text_len_profiled": manifest["text_len"],
                    "text_len_padded": {t: facts[t]["text_len"] for t in STAGES},
                    "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("out", "work")}}
    return out


METRICS = ("flops_vs_dense", "predicted_flops_vs_dense", "wall_vs_dense", "median_step_wall_vs_dense",
           "eval_loss_qa", "answer_accuracy", "eval_loss_captions")


def seeds_without_curves(per_seed: dict[int, dict]) -> list[str]:
    """Seeds run before ``train_loss_curve`` was recorded (the training-loss table leaves them out)."""
    return [str(s) for s, r in per_seed.items() if any("train_loss_curve" not in r[arm] for arm in ARMS)]


def summarize(per_seed: dict[int, dict]) -> tuple[dict, dict, str]:
    """Per-arm means (and min/max over seeds), the targets verdict and the Markdown table."""
    means = {arm: {m: statistics.mean(r[arm][m] for r in per_seed.values()) for m in METRICS} for arm in ARMS}
    for arm in ARMS:
        means[arm]["range_over_seeds"] = {m: [min(r[arm][m] for r in per_seed.values()),
                                              max(r[arm][m] for r in per_seed.values())] for m in METRICS}
    prof, dense, paper = means["profile"], means["dense"], means["paper"]
    speedup = 1 / prof["wall_vs_dense"]
    acc_gap_points = 100 * (dense["answer_accuracy"] - prof["answer_accuracy"])
    verdict = {
        "profile_speedup_end_to_end": speedup, "speedup_target": TARGET_SPEEDUP_E2E,
        "speedup_met": speedup >= TARGET_SPEEDUP_E2E,
        "profile_speedup_median_steps": 1 / prof["median_step_wall_vs_dense"],
        "accuracy_drop_points_vs_dense": acc_gap_points, "accuracy_met": acc_gap_points <= TARGET_ACC_POINTS,
        "profile_accuracy_ge_paper": prof["answer_accuracy"] >= paper["answer_accuracy"],
        "profile_qa_loss_le_paper": prof["eval_loss_qa"] <= paper["eval_loss_qa"],
        "measured_flops_profile_vs_paper": prof["flops_vs_dense"] / paper["flops_vs_dense"],
    }
    verdict["profile_ge_paper_met"] = verdict["profile_accuracy_ge_paper"] and verdict["profile_qa_loss_le_paper"]
    # Over seeds (each seed's arms share data, initial weights and machine: paired per seed).
    drops = over_seeds([-100 * r["profile"]["accuracy_vs_dense"] for r in per_seed.values()])
    verdict["accuracy_drop_points_over_seeds"] = drops
    verdict["accuracy_within_target_at_95"] = drops["upper_95"] <= TARGET_ACC_POINTS
    verdict["profile_minus_paper_accuracy_points"] = over_seeds(
        [100 * (r["profile"]["answer_accuracy"] - r["paper"]["answer_accuracy"]) for r in per_seed.values()])
    verdict["profile_minus_paper_qa_loss"] = over_seeds(
        [r["profile"]["eval_loss_qa"] - r["paper"]["eval_loss_qa"] for r in per_seed.values()])
    rows = ["| arm | FLOPs vs dense (predicted) | wall time vs dense (median steps) | QA loss | answer accuracy"
            " | caption loss |",
            "|---|---|---|---|---|---|"]
    for arm in ARMS:
        m = means[arm]
        rows.append(f"| {arm} | {m['flops_vs_dense']:.3f} ({m['predicted_flops_vs_dense']:.3f}) | "
                    f"{m['wall_vs_dense']:.3f} ({m['median_step_wall_vs_dense']:.3f}) | {m['eval_loss_qa']:.3f} | "
                    f"{m['answer_accuracy']:.3f} | {m['eval_loss_captions']:.3f} |")
    rows += ["", "| seed | profile tokens (alignment; instruction) | profile - dense, points (s.e.) "
             "| profile - paper, points | profile - paper, QA loss |", "|---|---|---|---|---|"]
    def stage_text(stage: dict) -> str:
        tok = stage.get("tokens") or {"method": "dense", "keep_ratio": 1.0}
        return f"{tok['method']} {tok['keep_ratio']:.3g}" + (" + layers" if stage.get("layers") else "")

    for seed, r in per_seed.items():
        tokens = "; ".join(stage_text(s) for s in r["profile"]["schedule"])
        rows.append(f"| {seed} | {tokens} | {100 * r['profile']['accuracy_vs_dense']:+.1f} "
                    f"({100 * r['profile']['accuracy_vs_dense_stderr']:.1f}) | "
                    f"{100 * (r['profile']['answer_accuracy'] - r['paper']['answer_accuracy']):+.1f} | "
                    f"{r['profile']['eval_loss_qa'] - r['paper']['eval_loss_qa']:+.3f} |")
    if not seeds_without_curves(per_seed):
        # how early each arm leaves a loss plateau (if the instruction stage has one)
        rows += ["", "| arm | mean training loss over the instruction stage (min-max over seeds) |", "|---|---|"]
        for arm in ARMS:
            per = [statistics.mean(v for _, v in r[arm]["train_loss_curve"]["instruction"]) for r in per_seed.values()]
            mean = means[arm]["instruction_train_loss_mean"] = statistics.mean(per)
            means[arm]["range_over_seeds"]["instruction_train_loss_mean"] = [min(per), max(per)]
            rows.append(f"| {arm} | {mean:.3f} ({min(per):.3f}-{max(per):.3f}) |")
    return means, verdict, "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=("test", "small", "demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--target-speedup", type=float, default=2.0, help="budget of the profile arm, per stage")
    ap.add_argument("--alignment-steps", type=int, default=None, help="default: the size's preset")
    ap.add_argument("--instruction-steps", type=int, default=None, help="default: the size's preset")
    add_extend_option(ap)
    add_output_options(ap, work_help="keep the runs here")
    args = ap.parse_args(argv)
    check_output_options(ap, args)
    if args.target_speedup <= 1.0:
        ap.error("--target-speedup must be > 1")
    settings = {"size": args.size, "target_speedup": args.target_speedup,
                "alignment_steps": args.alignment_steps, "instruction_steps": args.instruction_steps}
    earlier = load_earlier(ap, args, settings, set(ARMS))
    if earlier is not None:  # seeds trained at other learning rates do not belong in one table
        from sts_profile.recipe import RecipeConfig

        for seed, r in earlier["per_seed"].items():
            seed_cfg = r.get("_seed", {}).get("config", {})
            for key in ("lr_alignment", "lr_instruction"):
                if seed_cfg.get(key) != getattr(RecipeConfig, key):
                    ap.error(f"--extend {args.extend}: seed {seed} was trained with {key} = {seed_cfg.get(key)}, "
                             f"the recipe now uses {getattr(RecipeConfig, key)}; start a new file")
    work = args.work or Path(tempfile.mkdtemp(prefix="sts-schedule-quality-"))
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    per_seed = {}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # HF prints; stdout keeps the result only
            for seed in args.seeds:
                per_seed[seed] = run_seed(args, seed, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    config = {**settings, "seeds": args.seeds, "runtime_s": time.perf_counter() - started,
              "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    per_seed, config = merge_earlier(earlier, args.extend, per_seed, config)
    means, verdict, table = summarize(per_seed)
    without_curves = seeds_without_curves(per_seed)
    notes = [f"seeds {', '.join(without_curves)} have no train_loss_curve (run before it was recorded):"
             " the training-loss table is left out"] if without_curves else []
    notes += [f"seed {s}: {arm} needed uniform pooling in instruction too (keep ratio "
             f"{r[arm]['keep_ratio_instruction']:.3f}): layers alone cannot reach the budget"
             for s, r in per_seed.items() for arm in ("paper", "uniform") if r[arm]["instruction_pooling_added"]]
    result = {"arms": means, "per_seed": per_seed, "targets": verdict, "notes": notes, "table": table,
              "config": config}
    text = json.dumps(result, indent=2, default=str) + "\n"
    print(text, end="")
    print("\n" + table + "\n\n" + "\n".join(notes + [f"{k}: {v}" for k, v in verdict.items()]))
    if args.json is not None:
        atomic_write_text(args.json, text)  # temp file in the same folder, then rename
    return 0


if __name__ == "__main__":
    sys.exit(main())
