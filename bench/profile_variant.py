"""A variant of the quality bench's profile arm (another token method, or a pooling ramp) at the same FLOPs.

    python bench/profile_variant.py --results bench/results_schedule_quality_demo_lr5e-4.json \
        --method merge --seeds 0 --work /tmp/m0 --json merge.json
    python bench/profile_variant.py --results bench/results_schedule_quality_demo_lr5e-4.json \
        --method merge --seeds 1 --work /tmp/m1 --extend merge.json --json merge.json --overwrite
    python bench/profile_variant.py --results ... --end-factor 1.5 ...   # progressive pooling

For each seed of a ``schedule_quality.py`` result (``--results``): regenerate the seed's data
(``recipe_data``, as that bench does), take its profile arm's schedule, and change each
stage's constant token compression at keep ratio ``k``:

- ``--method M``: compress with M instead (same kept count where M keeps ``round(k N)`` tokens
  and pooling a grid; FLOPs are matched below).
- ``--end-factor F`` (> 1): a linear ramp from a harsher start to ``min(1, F k)`` at the stage
  end (progressive resizing; Random-LTD's rising kept tokens). F < 1: from a milder start to
  ``F k`` (fine tokens while the model first learns to read the image, coarse ones after).

The start (or, with F = 1, the constant ratio) is the mildest whose predicted LLM FLOPs for
the stage do not exceed the profile arm's (bisection); layer skipping is left as it is. ``--end-factor 1``
without ``--method`` trains the profile arm again: a control. The variant trains through both
stages as the recipe does (``train_two_stages``, the seed's initial weights), is evaluated
densely as the bench does (``evaluate_run``), and is compared with the same seed's dense and
profile arms in ``--results``. Those arms are not rerun: training is deterministic on this CPU
build (the control on seed 0 gave the stored profile accuracy exactly, its QA loss within 5e-6),
so the stored arms stand for reruns on the same data and weights. Differences are per seed
(accuracy points), with the mean, standard error and one-sided 95% bounds over seeds.

Each run's plan was fixed before its results; bench/README.md lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchio import add_extend_option, add_output_options, check_output_options, emit, load_earlier, \
    merge_earlier, over_seeds
from arm_variant import recipe_config
from schedule_quality import STAGES, train_loss_curve

SEED_KEYS = {"variant", "minus_dense_points", "minus_profile_points"}


def stored_config(result: dict, seed: int):
    """The recipe config the stored seed was run with, or a one-line reason why it is not today's."""
    stored = result["per_seed"][str(seed)]["_seed"]["config"]
    cfg = replace(recipe_config(stored["size"], seed), target_speedup=stored["target_speedup"])
    now = {k: getattr(cfg, k) for k in stored}
    differ = {k: (v, now[k]) for k, v in stored.items() if now[k] != v}
    return cfg, (f"seed {seed} ran with {differ} (stored, now)" if differ else None)


def variant(schedule, facts: dict, method: str | None = None, end_factor: float = 1.0):
    """``schedule`` with each stage's constant token compression done by ``method`` (None: as it
    is) and, for ``end_factor`` other than 1, ramped linearly to ``min(1, end_factor * k)``, at
    no more predicted stage FLOPs; returns (schedule, {stage: (method, start, end)}).

    Raises:
        ValueError: no start reaches the profile arm's predicted speedup.
    """
    from sts_profile.derive import predicted_speedup
    from sts_train.schedule import Schedule, TokenSparsity

    stages, changes = [], {}
    for stage in schedule.stages:
        tok = stage.tokens
        if tok is None or tok.curve != "constant":
            stages.append(stage)
            continue
        k, how = tok.keep_ratio, method or tok.method
        target = predicted_speedup(schedule, stage=stage.name, **facts)

        def tokens(start: float) -> TokenSparsity:
            end = start if end_factor == 1.0 else min(1.0, end_factor * k)
            return TokenSparsity(how, start, end, "linear" if end != start else "constant")

        def speedup(start: float, name=stage.name) -> float:  # falls as start rises
            trial = Schedule(schedule.schema_version, schedule.source, tuple(
                replace(s, tokens=tokens(start)) if s.name == name else s for s in schedule.stages))
            return predicted_speedup(trial, stage=name, **facts)

        # the mildest start whose predicted speedup reaches the profile arm's: kept counts make
        # the speedup a step function, so not schedule_quality.bisect_down (a point where it is equal)
        lo, hi = 1.0 / facts["num_visual_tokens"], 1.0
        if speedup(hi) >= target:
            lo = hi
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if speedup(mid) >= target else (lo, mid)
        start = lo
        chosen = tokens(math.floor(start * 1e4) / 1e4)  # rounded down: never more tokens
        if speedup(chosen.keep_ratio) < target:
            raise ValueError(f"stage {stage.name}: no start reaches the profile arm's predicted speedup"
                             f" {target:.3f} with end factor {end_factor}; pass a factor nearer 1")
        changes[stage.name] = (chosen.method, chosen.keep_ratio, chosen.keep_ratio_end)
        stages.append(replace(stage, tokens=chosen))
    return Schedule(schedule.schema_version, schedule.source, tuple(stages)), changes


def run_seed(result: dict, seed: int, work: Path, method: str | None, end_factor: float) -> dict:
    from sts_profile.recipe import Phases, evaluate_run, recipe_data, train_two_stages
    from sts_train.adapters import model_parts
    from sts_train.factory import build_model
    from sts_train.flops import LayerDims
    from sts_train.schedule import Schedule, dump_schedule

    stored = result["per_seed"][str(seed)]
    cfg, _ = stored_config(result, seed)
    phases, home = Phases(), work / f"seed{seed}"
    data = phases.run("data", recipe_data, cfg, home / "data")
    parts = model_parts(build_model(cfg.size, seed=seed))
    profile = Schedule.from_dict({"schema_version": 1, "source": {}, "stages": stored["profile"]["schedule"]})
    facts, stages, changes = {}, [], {}
    for stage in STAGES:  # the facts schedule_quality.py predicted each stage's FLOPs with
        facts[stage] = {"num_layers": parts.num_layers, "dims": LayerDims.of(parts),
                        "num_visual_tokens": parts.num_visual_tokens,
                        "text_len": stored["_seed"]["text_len_padded"][stage]}
        changed, what = variant(profile, facts[stage], method, end_factor)
        stages.append(changed.stage_named(stage))
        if stage in what:
            changes[stage] = what[stage]
    sched = Schedule(profile.schema_version, {"tool": "bench/profile_variant.py", "seed": seed,
                                              "method": method, "end_factor": end_factor}, tuple(stages))
    path = dump_schedule(sched, home / "schedules" / "variant.yaml")
    summaries = train_two_stages(cfg, data, home / "variant", phases, "variant", schedule=path)
    quality = phases.run("evaluate variant", evaluate_run, home / "variant", data, cfg.eval_limit)
    flops = {s: summaries[s]["flops"] for s in STAGES}
    arm = {"schedule": sched.to_dict()["stages"], "changes": changes,
           "flops_vs_profile": sum(flops.values()) / sum(stored["profile"]["flops"].values()),
           "flops_vs_dense": sum(flops.values()) / sum(stored["dense"]["flops"].values()),
           "wall_time_s": {s: summaries[s]["wall_time_s"] for s in STAGES}, "flops": flops,
           **{k: quality[k] for k in ("eval_loss_qa", "answer_accuracy", "eval_loss_captions", "per_kind",
                                       "answered")},
           "train_loss_curve": {s: train_loss_curve(home / "variant" / s) for s in STAGES}}
    acc = {name: stored[name]["answer_accuracy"] for name in ("dense", "profile")}
    return {"variant": arm, "stored_accuracy": acc,
            "facts": {s: {**f, "dims": f["dims"].__dict__} for s, f in facts.items()},
            "minus_dense_points": 100 * (arm["answer_accuracy"] - acc["dense"]),
            "minus_profile_points": 100 * (arm["answer_accuracy"] - acc["profile"]),
            "profile_minus_dense_points": 100 * (acc["profile"] - acc["dense"])}


def summarize(per_seed: dict) -> dict:
    """Over seeds: the variant's and the profile arm's drop against dense, the variant minus
    profile, and the two rules fixed before the runs (within 1 point of dense; adoption)."""
    rows = list(per_seed.values())

    def stats(values: list[float]) -> dict:
        out = {**over_seeds(values), "median": statistics.median(values)}
        return {**out, "lower_95": 2 * out["mean"] - out["upper_95"]}  # mean - t s.e.

    drop = stats([-r["minus_dense_points"] for r in rows])
    gain = stats([r["minus_profile_points"] for r in rows])
    return {"seeds": len(rows), "variant_drop_vs_dense_points": drop,
            "profile_drop_vs_dense_points": stats([-r["profile_minus_dense_points"] for r in rows]),
            "variant_minus_profile_points": gain,
            "within_1_point_met": bool(len(rows) > 1 and drop["upper_95"] <= 1.0 and drop["median"] <= 1.0),
            "adopt": bool(len(rows) > 1 and gain["mean"] > 0 and gain["lower_95"] > 0),
            "flops_vs_profile": [round(r["variant"]["flops_vs_profile"], 4) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    from sts_train.schedule import TOKEN_METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a schedule_quality.py --json result")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds of that result to run")
    ap.add_argument("--method", default=None, choices=TOKEN_METHODS,
                    help="compress tokens with this method instead (default: the profile arm's)")
    ap.add_argument("--end-factor", type=float, default=1.0,
                    help="ramp the keep ratio linearly to min(1, this x the profile's) (default 1: no ramp)")
    add_output_options(ap, work_help="data, schedules and runs of each seed")
    add_extend_option(ap)
    args = ap.parse_args(argv)
    check_output_options(ap, args)
    if not 0.0 < args.end_factor * 0.5 <= 1.0:  # a ratio's end at most 1 for keep ratios up to 0.5
        ap.error(f"--end-factor {args.end_factor}: pass a number in (0, 2]")
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
            ap.error(f"--results {args.results}: {why}; the variant would not be comparable")
    settings = {"results": str(args.results), "method": args.method, "end_factor": args.end_factor}
    earlier = load_earlier(ap, args, settings, SEED_KEYS)
    work = args.work or Path(tempfile.mkdtemp(prefix="sts-profile-variant-"))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # HF prints; stdout keeps the result only
        per_seed = {seed: run_seed(result, seed, work, args.method, args.end_factor) for seed in args.seeds}
    config = {**settings, "seeds": args.seeds, "runtime_s": time.perf_counter() - started}
    per_seed, config = merge_earlier(earlier, args.extend, per_seed, config)
    emit({"per_seed": per_seed, "summary": summarize(per_seed), "config": config}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
