"""Progressive pooling: the profile arm's pooling, harsher early and milder late, at the same predicted FLOPs.

    python bench/progressive_pooling.py --results bench/results_schedule_quality_demo_lr5e-4.json \
        --seeds 0 --work /tmp/pp0 --json pp.json
    python bench/progressive_pooling.py --results bench/results_schedule_quality_demo_lr5e-4.json \
        --seeds 1 --work /tmp/pp1 --extend pp.json --json pp.json --overwrite

For each seed of a ``schedule_quality.py`` result (``--results``): regenerate the seed's data
(``generate_shapes``, as that bench does), take its profile arm's schedule, and replace each
stage's constant uniform pooling at keep ratio ``k`` by a linear ramp from a harsher start to
``min(1, 1.5 k)`` at the stage end, the start chosen (bisection) so that the stage's predicted
LLM FLOPs equal those of the constant pooling; layer skipping is left as it is. Train that
schedule through both stages as the recipe does (``train_two_stages``, the seed's initial
weights), evaluate it densely as the bench does (``evaluate_run``), and compare it with the same
seed's dense and profile arms in ``--results``. Those arms are not rerun: training is
deterministic on this CPU build (``reports/example/`` regenerated on 2026-12-05 matched the
bench's seed-0 arms to the digit), so the stored arms stand for reruns on the same data and
weights. Differences are per seed (accuracy points), with the mean, standard error and one-sided
95% bound over seeds.

Why this arm: evaluation always runs on all 576 tokens, and in ``arm_variant.py`` the profile
runs' drop against dense was in shape-colour questions (small shapes averaged with their
background); progressive resizing (low resolution early, full late) and Random-LTD (kept
tokens rising over training) spend the compression where the model learns coarse things and
give the end of training finer tokens, at the same mean cost.

``--end-factor 1`` trains the stored profile schedule again (start = end = k): a control that
the stored arms still stand for reruns.

Fixed before any result (2026-12-06 01:22 UTC, committed with this script): first the control on
seed 0, then seeds 0 to 11 in that order, one invocation each; no seed is started after 03:15
UTC. Judged as the 12-seed
bench was: within 1 point of dense only if both the one-sided 95% bound of the mean drop and
the median drop are at most 1 point. The derivation adopts the ramp (as its rule for a constant
pooling choice) only if ramp minus profile has a mean above 0 with its one-sided 95% lower
bound above 0 over the seeds run; otherwise it is reported and not adopted.

Added at 01:33 UTC, after seed 0 (ramp 15.9 points below profile: it stalled near 40%) and
before any other seed's result: the run stops after seed 3 if the mean of ramp minus profile
over seeds 0-3 is below 0 (futility: the adoption rule could then hardly be met in 12 seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchio import add_extend_option, add_output_options, check_output_options, emit, load_earlier, \
    merge_earlier, over_seeds
from arm_variant import recipe_config
from schedule_quality import STAGES, bisect_down, train_loss_curve

END_FACTOR = 1.5  # the ramp ends at min(1, END_FACTOR * k); 1 trains the profile arm again (a control)
SEED_KEYS = {"ramp", "minus_dense_points", "minus_profile_points"}


def stored_config(result: dict, seed: int):
    """The recipe config the stored seed was run with, or a one-line reason why it is not today's."""
    stored = result["per_seed"][str(seed)]["_seed"]["config"]
    cfg = replace(recipe_config(stored["size"], seed), target_speedup=stored["target_speedup"])
    now = {k: getattr(cfg, k) for k in stored}
    differ = {k: (v, now[k]) for k, v in stored.items() if now[k] != v}
    return cfg, (f"seed {seed} ran with {differ} (stored, now)" if differ else None)


def ramped(schedule, facts: dict, end_factor: float = END_FACTOR):
    """``schedule`` with each constant uniform pooling ramped (linear, harsher start, milder end)
    at the same predicted stage FLOPs; returns (schedule, {stage: (start, end)})."""
    from sts_profile.derive import predicted_speedup
    from sts_train.schedule import Schedule, TokenSparsity

    stages, ramps = [], {}
    for stage in schedule.stages:
        tok = stage.tokens
        if tok is None or tok.method != "uniform" or tok.curve != "constant":
            stages.append(stage)
            continue
        k, end = tok.keep_ratio, min(1.0, end_factor * tok.keep_ratio)
        target = predicted_speedup(schedule, stage=stage.name, **facts)

        def speedup(start: float, name=stage.name) -> float:  # rises as start falls
            trial = Schedule(schedule.schema_version, schedule.source, tuple(
                replace(s, tokens=TokenSparsity("uniform", start, end, "linear")) if s.name == name else s
                for s in schedule.stages))
            return predicted_speedup(trial, stage=name, **facts)

        # bisect_down finds x in [0, hi] with fn(x) == target for fn decreasing: fn = -speedup(k - x)
        floor = 1.0 / facts["num_visual_tokens"]
        x = bisect_down(lambda v: -speedup(max(floor, k - v)), -target, k - floor)
        start = round(max(floor, k - x), 4)
        ramps[stage.name] = (start, end)
        stages.append(replace(stage, tokens=TokenSparsity("uniform", start, end, "linear")))
    return Schedule(schedule.schema_version, schedule.source, tuple(stages)), ramps


def run_seed(result: dict, seed: int, work: Path, end_factor: float) -> dict:
    from sts_profile.recipe import Phases, evaluate_run, train_two_stages
    from sts_train.adapters import model_parts
    from sts_train.factory import build_model, get_size
    from sts_train.flops import LayerDims
    from sts_train.schedule import Schedule, dump_schedule
    from sts_train.shapes import generate_shapes

    stored = result["per_seed"][str(seed)]
    cfg, _ = stored_config(result, seed)
    phases, home = Phases(), work / f"seed{seed}"
    data = phases.run("data", generate_shapes, home / "data", n_alignment=cfg.n_alignment,
                      n_instruction=cfg.n_instruction, n_eval=cfg.n_eval,
                      image_size_px=get_size(cfg.size).image_size_px, seed=seed)
    parts = model_parts(build_model(cfg.size, seed=seed))
    profile = Schedule.from_dict({"schema_version": 1, "source": {}, "stages": stored["profile"]["schedule"]})
    facts, stages, ramps = {}, [], {}
    for stage in STAGES:  # the facts schedule_quality.py predicted each stage's FLOPs with
        facts[stage] = {"num_layers": parts.num_layers, "dims": LayerDims.of(parts),
                        "num_visual_tokens": parts.num_visual_tokens,
                        "text_len": stored["_seed"]["text_len_padded"][stage]}
        one, r = ramped(profile, facts[stage], end_factor)
        stages.append(one.stage_named(stage))
        if stage in r:
            ramps[stage] = r[stage]
    sched = Schedule(profile.schema_version, {"tool": "bench/progressive_pooling.py", "seed": seed, "ramps": ramps},
                     tuple(stages))
    path = dump_schedule(sched, home / "schedules" / "ramp.yaml")
    summaries = train_two_stages(cfg, data, home / "ramp", phases, "ramp", schedule=path)
    quality = phases.run("evaluate ramp", evaluate_run, home / "ramp", data, cfg.eval_limit)
    flops = {s: summaries[s]["flops"] for s in STAGES}
    ramp = {"schedule": sched.to_dict()["stages"], "ramps": ramps,
            "flops_vs_profile": sum(flops.values()) / sum(stored["profile"]["flops"].values()),
            "flops_vs_dense": sum(flops.values()) / sum(stored["dense"]["flops"].values()),
            "wall_time_s": {s: summaries[s]["wall_time_s"] for s in STAGES}, "flops": flops,
            **{k: quality[k] for k in ("eval_loss_qa", "answer_accuracy", "eval_loss_captions", "per_kind",
                                        "answered")},
            "train_loss_curve": {s: train_loss_curve(home / "ramp" / s) for s in STAGES}}
    acc = {arm: stored[arm]["answer_accuracy"] for arm in ("dense", "profile")}
    return {"ramp": ramp, "stored_accuracy": acc,
            "facts": {s: {**f, "dims": f["dims"].__dict__} for s, f in facts.items()},
            "minus_dense_points": 100 * (ramp["answer_accuracy"] - acc["dense"]),
            "minus_profile_points": 100 * (ramp["answer_accuracy"] - acc["profile"]),
            "profile_minus_dense_points": 100 * (acc["profile"] - acc["dense"])}


def summarize(per_seed: dict) -> dict:
    rows = list(per_seed.values())
    drop = [-r["minus_dense_points"] for r in rows]
    gain = [r["minus_profile_points"] for r in rows]
    vs_profile = over_seeds(gain)
    lower = 2 * vs_profile["mean"] - vs_profile["upper_95"]  # mean - t s.e.
    return {"seeds": len(rows), "ramp_drop_vs_dense_points": {**over_seeds(drop), "median": statistics.median(drop)},
            "profile_drop_vs_dense_points": {**over_seeds([-r["profile_minus_dense_points"] for r in rows]),
                                             "median": statistics.median(-r["profile_minus_dense_points"]
                                                                         for r in rows)},
            "ramp_minus_profile_points": {**vs_profile, "lower_95": lower,
                                          "median": statistics.median(gain)},
            "within_1_point_met": bool(len(rows) > 1 and over_seeds(drop)["upper_95"] <= 1.0
                                       and statistics.median(drop) <= 1.0),
            "adopt": bool(len(rows) > 1 and vs_profile["mean"] > 0 and lower > 0),
            "flops_vs_profile": [round(r["ramp"]["flops_vs_profile"], 4) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a schedule_quality.py --json result")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds of that result to run")
    ap.add_argument("--end-factor", type=float, default=END_FACTOR,
                    help="the ramp ends at min(1, this x the profile keep ratio); 1 trains the profile arm again")
    add_output_options(ap, work_help="data, schedules and runs of each seed")
    add_extend_option(ap)
    args = ap.parse_args(argv)
    check_output_options(ap, args)
    if not args.end_factor >= 1.0:
        ap.error(f"--end-factor {args.end_factor}: the ramp must end at or above the profile's keep ratio;"
                 " pass 1 or more")
    try:
        result = json.loads(args.results.read_text())
        held = {int(s) for s in result["per_seed"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        ap.error(f"--results {args.results}: not a schedule_quality.py result ({type(e).__name__}: {e})")
    for seed in args.seeds:
        if seed not in held:
            ap.error(f"--results {args.results} holds no seed {seed}; it holds {sorted(held)}")
        why = stored_config(result, seed)[1]
        if why:
            ap.error(f"--results {args.results}: {why}; the ramp would not be comparable")
    earlier = load_earlier(ap, args, {"results": str(args.results), "end_factor": args.end_factor}, SEED_KEYS)
    work = args.work or Path(__import__("tempfile").mkdtemp(prefix="sts-progressive-pooling-"))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # HF prints; stdout keeps the result only
        per_seed = {seed: run_seed(result, seed, work, args.end_factor) for seed in args.seeds}
    config = {"results": str(args.results), "end_factor": args.end_factor, "seeds": args.seeds,
              "runtime_s": time.perf_counter() - started}
    per_seed, config = merge_earlier(earlier, args.extend, per_seed, config)
    emit({"per_seed": per_seed, "summary": summarize(per_seed), "config": config}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
