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
def warnings_as_lines() -> Iterator[list[str]]:
    """Print each warning raised inside as one ``warning: <message>`` line on stderr (no file
    name, line number or source line, as Python's default display has); yields the list the
    messages are added to when the block ends."""
    import warnings

    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield said
        finally:
            said += dict.fromkeys(str(w.message) for w in caught)  # each once, in order
            for message in said:
                echo(f"warning: {message}")


def run_app(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run ``app`` as a console script, with a usage error (an unknown option or command, a
    missing argument, a value of the wrong type) printed as one ``error:`` line, exit 2, instead
    of Click's usage text and boxed panel."""

    def is_a(exc: BaseException, name: str) -> bool:  # Typer vendors Click: match Click's classes by name
        return any(cls.__name__ == name for cls in type(exc).__mro__)

    try:
        code = app(args=args, standalone_mode=False)
    except Exception as exc:
        if is_a(exc, "NoArgsIsHelpError"):  # no arguments at all: Typer has printed the help
            pass
        elif is_a(exc, "UsageError"):
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "the command"
            typer.echo(f"error: {exc.format_message().rstrip('.')}; see {where} --help", err=True)
        elif is_a(exc, "Abort"):  # Ctrl-C at a prompt
            typer.echo("interrupted", err=True)
            sys.exit(130)
        else:
            raise
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


def is_rank_zero() -> bool:
    """True on the process that writes files (rank 0, or no distributed launcher)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def echo(msg: str) -> None:
    """Print a progress line on rank 0 only, flushed (long jobs are watched live)."""
    if is_rank_zero():
        print(msg, file=sys.stderr, flush=True)
