"""One more arm on seeds that bench/schedule_quality.py ran, compared with their dense and profile arms.

    python bench/arm_variant.py --seed-dirs W0/seed0 W2/seed2 --schedule merge.yaml --name merge \
        --out /tmp/variants --json merge.json
    python bench/arm_variant.py --seed-dirs W0/seed0 --pooled-eval --json pooled.json

Each ``--seed-dirs`` entry is a ``seedN`` folder of a kept ``schedule_quality.py --work``
folder (its data, its ``dense``/``profile`` runs and ``schedules/profile.yaml``).

``--schedule FILE --name NAME``: train FILE through both stages as the recipe does
(``train_two_stages``, the seed's data and initial weights, the recipe's settings for
``--size``), evaluate it densely on the held-out QA split (as ``evaluate_run`` does), and pair
its answers with the dense and profile arms' (``paired_difference``). ``{seed}`` in FILE is replaced by the seed, for
schedules derived per seed.

``--pooled-eval``: score the dense and profile arms' final checkpoints (and the new arm's) on
the held-out QA split with the profile arm's instruction token compression forced on at
evaluation (teacher-forced answer accuracy, as ``sts-train evaluate`` scores it, on the
compressed sequence): whether a model trained on compressed tokens loses accuracy because
evaluation shows it every token, or because it learned less.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

from benchio import add_output_options, check_output_options, emit, over_seeds

STAGES = ("alignment", "instruction")


def seed_of(folder: Path) -> int | None:
    """N of a ``seedN`` folder that holds a dense run, else None."""
    match = re.fullmatch(r"seed(\d+)", folder.name)
    if match is None or not (folder / "dense" / "instruction").is_dir():
        return None
    return int(match.group(1))


def recipe_config(size: str, seed: int):
    """The recipe's settings for ``size`` (what schedule_quality.py trains the demo and test sizes with)."""
    from sts_profile.recipe import RecipeConfig, test_size

    cfg = RecipeConfig(size=size, seed=seed)
    return test_size(cfg) if size == "test" else cfg


def settings_differ(home: Path, size: str) -> str | None:
    """What the seed's dense run set differently from the recipe now (steps, learning rate)."""
    import yaml

    cfg = recipe_config(size, seed_of(home))
    for stage in STAGES:
        training = yaml.safe_load((home / "dense" / stage / "sts_run.yaml").read_text())["training"]
        want = {"max_steps": getattr(cfg, f"{stage}_steps"), "learning_rate": getattr(cfg, f"lr_{stage}")}
        for key, value in want.items():
            if training.get(key) != value:
                return f"{stage} {key} = {training.get(key)} (now {value})"
    return None


def data_of(home: Path) -> dict:
    from sts_train.shapes import dataset_paths

    return dataset_paths(home / "data")


def qa_quality(run_dir: Path, data: dict, limit: int | None) -> dict:
    """Dense QA loss, accuracy and per-answer outcomes of a run's final checkpoint (the QA half
    of the recipe's ``evaluate_run``)."""
    from sts_profile.recipe import final_checkpoint
    from sts_train.evaluate import evaluate_split
    from sts_train.modelio import load_model, load_processor

    final = final_checkpoint(run_dir / "instruction")
    model, processor = load_model(final), load_processor(final)
    qa = evaluate_split(model, processor, data["instruction_eval"], data["images"].parent, limit=limit)
    return {"checkpoint": str(final), "eval_loss_qa": qa["eval_loss"], **qa}


def compressed_accuracy(checkpoint: Path, data: dict, method: str, keep_ratio: float, batch_size: int = 8) -> dict:
    """QA loss and answer accuracy of ``checkpoint`` with ``method`` at ``keep_ratio`` forced on."""
    import torch
    import torch.nn.functional as F

    from sts_train.adapters import model_parts
    from sts_train.compress import TokenCompressor
    from sts_train.data import IGNORE_INDEX, LlavaCollator, LlavaDataset
    from sts_train.evaluate import turn_hits
    from sts_train.modelio import load_model, load_processor, pad_token_id

    model, processor = load_model(checkpoint), load_processor(checkpoint)
    model.eval()
    parts, pad = model_parts(model), pad_token_id(processor.tokenizer)
    compressor = TokenCompressor(model, parts, pad)
    compressor.set(method, keep_ratio, torch.Generator().manual_seed(0))  # random: the same draw each run
    compressor.force = True
    dataset = LlavaDataset(data["instruction_eval"], data["images"].parent, processor,
                           num_image_tokens=parts.num_visual_tokens)
    collate, eos = LlavaCollator(pad_token_id=pad), dataset.tokenizer.eos_token_id
    hits, total, count = [], 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            out = model(**collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]))
            target = out.llm_labels[:, 1:]  # the labels of the compressed sequence the LLM ran
            supervised = target != IGNORE_INDEX
            logits = out.logits[:, :-1][supervised].float()
            total += F.cross_entropy(logits, target[supervised], reduction="sum").item()
            count += int(supervised.sum())
            hit = torch.zeros_like(supervised)
            hit[supervised] = logits.argmax(-1) == target[supervised]
            for row in range(target.shape[0]):
                hits += turn_hits(target[row], hit[row], eos)
    return {"method": method, "keep_ratio": keep_ratio, "eval_loss_qa": total / max(count, 1),
            "answer_accuracy": sum(hits) / len(hits), "answered": len(hits)}


def run_seed(args, home: Path) -> dict:
    from sts_profile.recipe import Phases, train_two_stages
    from sts_train.evaluate import paired_difference
    from sts_train.schedule import load_schedule

    seed, data = seed_of(home), data_of(home)
    cfg = recipe_config(args.size, seed)
    out, evals = {"seed": seed}, {arm: qa_quality(home / arm, data, cfg.eval_limit) for arm in ("dense", "profile")}
    if args.schedule is not None:
        schedule = Path(str(args.schedule).replace("{seed}", str(seed)))
        run = args.out / f"seed{seed}" / args.name
        summaries = train_two_stages(cfg, data, run, Phases(), args.name, schedule=schedule)
        evals[args.name] = qa_quality(run, data, cfg.eval_limit)
        out.update(schedule=load_schedule(schedule).to_dict()["stages"],
                   wall_time_s={s: summaries[s]["wall_time_s"] for s in STAGES},
                   flops={s: summaries[s]["flops"] for s in STAGES})
    for arm, quality in evals.items():
        out[arm] = {k: quality[k] for k in ("eval_loss_qa", "answer_accuracy", "per_kind")}
        for base in ("dense", "profile"):
            if arm != base:
                diff = paired_difference(evals[base]["outcomes"], quality["outcomes"])
                out[arm][f"minus_{base}_points"] = 100 * diff["difference"]
                out[arm][f"minus_{base}_stderr_points"] = 100 * diff["stderr"]
    if args.pooled_eval:
        tokens = load_schedule(home / "schedules" / "profile.yaml").stage_named("instruction").tokens
        for arm in evals:
            final = Path(evals[arm]["checkpoint"])
            out[arm]["compressed_eval"] = compressed_accuracy(final, data, tokens.method, tokens.keep_ratio)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed-dirs", type=Path, nargs="+", required=True, help="seedN folders of schedule_quality runs")
    ap.add_argument("--size", default="demo", choices=("test", "small", "demo"), help="the size those runs used")
    ap.add_argument("--schedule", default=None, help="schedule of the new arm ({seed}: the seed)")
    ap.add_argument("--name", default="variant", help="the new arm's name")
    ap.add_argument("--out", type=Path, default=None, help="train the new arm here (new or empty folder)")
    ap.add_argument("--pooled-eval", action="store_true",
                    help="also score with the profile arm's instruction compression forced on")
    add_output_options(ap)
    args = ap.parse_args(argv)
    check_output_options(ap, args)
    if args.size == "small":
        ap.error("--size small: the bench's small preset is not applied here; use demo or test")
    if (args.schedule is None) != (args.out is None):
        ap.error("--schedule and --out go together")
    if args.name in ("dense", "profile"):
        ap.error(f"--name {args.name} is one of the seed's own arms; pick another name")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        ap.error(f"{args.out} is a file or a non-empty folder; pass a new or empty folder")
    homes = [folder.resolve() for folder in args.seed_dirs]
    for home in homes:
        if seed_of(home) is None:
            ap.error(f"{home}: not a seedN folder of a schedule_quality.py --work folder; pass one")
        differs = settings_differ(home, args.size)
        if differs:
            ap.error(f"{home}: its dense run was trained with {differs}, not the recipe's current settings for"
                     f" --size {args.size}; the new arm would not be comparable")
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # HF prints; stdout keeps the result only
        per_seed = [run_seed(args, home) for home in homes]
    summary = {}
    arms = [a for a in (args.name if args.schedule else None, "profile") if a]
    for arm in arms:
        for base in ("dense", "profile"):
            key = f"minus_{base}_points"
            if base != arm:
                summary[f"{arm}_{key}"] = over_seeds([r[arm][key] for r in per_seed])
    result = {"per_seed": per_seed, "summary": summary,
              "config": {"seed_dirs": [str(h) for h in homes], "size": args.size, "schedule": args.schedule,
                         "name": args.name, "pooled_eval": args.pooled_eval,
                         "runtime_s": time.perf_counter() - started}}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
