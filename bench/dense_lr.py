"""The dense demo baseline at several instruction-tuning learning rates (how the recipe's
default was chosen: on the dense run alone, no sparse arm).

    python bench/dense_lr.py --seeds 0 --lrs 2.5e-4 5e-4 1e-3 2e-3 3e-3 --json bench/results_dense_lr.json

Each (seed, learning rate) is the recipe's dense run (sts_profile.recipe: shapes data of that
seed, alignment then instruction tuning from the factory model, the demo's sizes and steps)
with only ``lr_instruction`` changed, then the dense evaluation of the held-out QA split:
answer accuracy (every turn), its accuracy per question kind, and the QA loss. Training is
deterministic per seed on one machine. About 6 minutes per run at the demo size on 2 cores.
Progress goes to stderr; the JSON to stdout (and to ``--json``, written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchio import add_output_options, check_output_options
from sts_train.configtools import atomic_write_text


def run_one(size: str, seed: int, lr: float, work: Path) -> dict:
    from sts_profile.recipe import Phases, RecipeConfig, evaluate_run, recipe_data, test_size, train_two_stages
    from sts_train.shapes import dataset_paths

    cfg = RecipeConfig(size=size, seed=seed)
    cfg = replace(test_size(cfg) if size == "test" else cfg, lr_instruction=lr)  # test: seconds, a dry run
    data_dir = work / f"data_seed{seed}"
    # one data set per seed, shared by its rates
    data = dataset_paths(data_dir) if (data_dir / "dataset_info.json").exists() else recipe_data(cfg, data_dir)
    started = time.perf_counter()
    run_dir = work / f"seed{seed}_lr{lr:g}"
    train_two_stages(cfg, data, run_dir, Phases(), f"dense lr {lr:g}")
    evaluated = evaluate_run(run_dir, data, None)
    evaluated.pop("outcomes")
    return {"seed": seed, "lr_instruction": lr, "lr_alignment": cfg.lr_alignment,
            "instruction_steps": cfg.instruction_steps, "wall_s": time.perf_counter() - started, **evaluated}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="demo", choices=("test", "small", "demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3])
    add_output_options(ap, work_help="keep the runs here")
    args = ap.parse_args(argv)
    check_output_options(ap, args)
    if any(lr <= 0 for lr in args.lrs):
        ap.error("--lrs must be positive")
    work = args.work or Path(tempfile.mkdtemp(prefix="sts-dense-lr-"))
    runs = []
    try:
        with contextlib.redirect_stdout(sys.stderr):  # HF prints; stdout keeps the result only
            for seed in args.seeds:
                for lr in args.lrs:
                    runs.append(run_one(args.size, seed, lr, work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"config": {"size": args.size, "seeds": args.seeds, "lrs": args.lrs}, "runs": runs}
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    for r in runs:
        print(f"seed {r['seed']} lr {r['lr_instruction']:g}: accuracy {r['answer_accuracy']:.3f}, "
              f"QA loss {r['eval_loss_qa']:.3f}", file=sys.stderr)
    if args.json is not None:
        atomic_write_text(args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
