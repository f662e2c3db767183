"""What the bench scripts share: the options ``--json``, ``--overwrite``, ``--work``,
``--extend``, and the statistics over seeds (mean, standard error, one-sided 95% bound)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# One-sided 95% quantiles of Student's t by degrees of freedom; past 30 the normal 1.645.
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
        10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def t95_one_sided(df: int) -> float:
    """t quantile for a one-sided 95% bound (the tabled df at or below ``df``: conservative)."""
    if df < 1:
        return float("nan")
    return 1.645 if df > 30 else _T95[max(k for k in _T95 if k <= df)]


def over_seeds(values: list[float]) -> dict:
    """Mean, standard error over seeds and the one-sided 95% upper bound of the mean
    (mean + t s.e., Student t with seeds - 1 degrees of freedom; NaN for one seed)."""
    mean = statistics.mean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"mean": mean, "stderr_over_seeds": se, "upper_95": mean + t95_one_sided(len(values) - 1) * se}


def add_output_options(ap: argparse.ArgumentParser, work_help: str | None = None) -> None:
    """``--json`` and ``--overwrite``; ``--work`` too when ``work_help`` says what it keeps."""
    if work_help is not None:
        ap.add_argument("--work", type=Path, default=None, help=f"{work_help} (new or empty folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def check_output_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (argparse error, exit 2) to replace a result file or to fill a non-empty work folder."""
    if args.json is not None and args.json.exists() and not args.overwrite:
        ap.error(f"{args.json} exists; pass --overwrite to replace it")
    work = getattr(args, "work", None)
    if work is not None and work.exists() and any(work.iterdir()):
        ap.error(f"{work} is not empty; pass a new or empty folder")


def add_extend_option(ap: argparse.ArgumentParser) -> None:
    """``--extend``: add seeds to an earlier ``--json`` result of the same settings."""
    ap.add_argument("--extend", type=Path, default=None,
                    help="an earlier --json result of the same settings to add seeds to (only new seeds run)")
    ap.add_argument("--replace", action="store_true",
                    help="with --extend: seeds it already holds are run again and their results replaced"
                         " (after a fix; the result's config lists them)")


def load_earlier(ap: argparse.ArgumentParser, args: argparse.Namespace, settings: dict,
                 seed_keys: set[str]) -> dict | None:
    """The earlier result ``--extend`` names, or None; argparse error (exit 2) when it does not fit.

    ``settings`` are the ``config`` entries the earlier run must share with this one (a missing
    entry in the earlier file counts as None, a preset); ``seed_keys`` are entries every per-seed
    result of this script has (another script's result lacks them); a seed it already holds is
    refused unless ``--replace`` is given.
    """
    if args.extend is None:
        if args.replace:
            ap.error("--replace needs --extend (the earlier result whose seeds to run again)")
        return None
    path = args.extend
    try:
        earlier = json.loads(path.read_text())
        earlier["per_seed"] = {int(k): v for k, v in earlier["per_seed"].items()}
        config = earlier["config"]
        differ = {k: config.get(k) for k, v in settings.items() if config.get(k) != v}
        lacking = sorted({k for r in earlier["per_seed"].values() for k in seed_keys - set(r)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        ap.error(f"--extend {path}: not a result of this script ({type(e).__name__}: {e}); pass a --json file it wrote")
    if not earlier["per_seed"]:
        ap.error(f"--extend {path} holds no per-seed results; pass a --json file this script wrote")
    if lacking:
        ap.error(f"--extend {path}: not a result of this script (per-seed results lack {lacking}); "
                 "pass a --json file it wrote")
    if differ:
        ap.error(f"--extend {path} was run with {differ}; pass the same settings or another file")
    again = sorted(set(args.seeds) & set(earlier["per_seed"]))
    if again and not args.replace:
        ap.error(f"--extend {path} already holds seed(s) {again}; drop them from --seeds, or pass --replace")
    return earlier


def merge_earlier(earlier: dict | None, path: Path | None, per_seed: dict, config: dict) -> tuple[dict, dict]:
    """Per-seed results and config over both runs (unchanged without ``--extend``)."""
    if earlier is None:
        return per_seed, config
    merged = dict(sorted({**earlier["per_seed"], **per_seed}.items()))
    return merged, {**config, "seeds": list(merged), "seeds_run_now": config["seeds"],
                    "replaced_seeds": sorted(set(per_seed) & set(earlier["per_seed"])),
                    "extended_from": {"file": str(path), "config": earlier["config"]}}


def emit(result: dict, json_path: Path | None) -> None:
    """Print ``result`` as JSON to stdout and, with ``--json``, write it there (atomically)."""
    from sts_train.configtools import atomic_write_text

    text = json.dumps(result, indent=2, default=str) + "\n"
    print(text, end="")
    if json_path is not None:
        atomic_write_text(json_path, text)  # temp file in the same folder, then rename
