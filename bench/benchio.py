"""Command-line output options the bench scripts share: ``--json``, ``--overwrite``, ``--work``."""

from __future__ import annotations

import argparse
from pathlib import Path


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
