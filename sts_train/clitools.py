"""Shared CLI plumbing: map user errors to one line and exit code 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from sts_train.errors import StsError

EXIT_USER_ERROR = 2


def one_line(message: str) -> str:
    """The message itself, when a DataLoader worker raised it and torch re-raised it with the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback
    ... sts_train.errors.DataError: <message>")."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn an :class:`StsError` into ``error: <msg>`` on stderr (one line), exit 2."""
    try:
        yield
    except StsError as exc:
        typer.echo(f"error: {one_line(str(exc))}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Print each warning raised inside as one ``warning: <message>`` line on stderr (no file
    name, line number or source line, as Python's default display has)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for message in dict.fromkeys(str(w.message) for w in caught):  # each once, in order
                echo(f"warning: {message}")


def is_rank_zero() -> bool:
    """True on the process that writes files (rank 0, or no distributed launcher)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def echo(msg: str) -> None:
    """Print a progress line on rank 0 only, flushed (long jobs are watched live)."""
    if is_rank_zero():
        print(msg, file=sys.stderr, flush=True)
