"""Field checks of the schedule contract: each names the key, the value and the fix.

``__post_init__`` methods raise :class:`FieldError` (owner.key); ``build`` re-raises it with
the full key path (``schedule.stages[1].tokens.keep_ratio``) that ``from_dict`` knows.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Callable, Mapping

from sts_train.errors import ScheduleError


class FieldError(ScheduleError):
    """A bad field, raised by ``__post_init__``; ``from_dict`` re-raises it with the key path."""

    def __init__(self, owner: str, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{owner}.{key} {problem}")


def build(where: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` (a class or checker), putting the key path ``where`` into its field errors."""
    try:
        return fn(**kwargs)
    except FieldError as exc:
        raise ScheduleError(f"{where}.{exc.key} {exc.problem}") from None


def names(options: Any) -> str:
    return ", ".join(options)


def choice(owner: str, key: str, value: Any, options: Any) -> None:
    if not isinstance(value, str) or value not in options:
        raise FieldError(owner, key, f"= {value!r} is not known; use one of: {names(options)}")


def number(owner: str, key: str, value: Any, lo: float, hi: float, interval: str) -> float:
    """Check ``value`` is a real number inside ``interval`` (bounds ``lo``/``hi``) and return it."""
    if isinstance(value, str):  # YAML 1.1 reads 5e-1 (no dot) as a string; the run config accepts it too
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise FieldError(owner, key, f"= {value!r} is not a number; write a number in {interval}")
    value = float(value)
    lo_ok = value > lo if interval.startswith("(") else value >= lo
    hi_ok = value < hi if interval.endswith(")") else value <= hi
    if not (lo_ok and hi_ok):
        raise FieldError(owner, key, f"= {value!r} is outside {interval}; write a number in {interval}")
    return value


def integer(owner: str, key: str, value: Any, minimum: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise FieldError(owner, key, f"= {value!r} is not an integer; write a whole number")
    if minimum is not None and value < minimum:
        raise FieldError(owner, key, f"= {value!r} is below {minimum}; write an integer >= {minimum}")
    return int(value)


def plan_arg(key: str, value: Any, minimum: int) -> int:
    return build("plan", integer, owner="plan", key=key, value=value, minimum=minimum)


def sequence(owner: str, key: str, value: Any, example: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise FieldError(owner, key, f"= {value!r} is not a list; write e.g. {example}")
    return tuple(value)


def mapping(d: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    """Check ``d`` is a mapping with only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(d, Mapping):
        raise ScheduleError(f"{where} must be a mapping with keys {names(allowed)} (got {type(d).__name__})")
    for key in d:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ScheduleError(f"{where}.{key} is not a known key; {hint}allowed keys: {names(allowed)}")
    for key in required:
        if key not in d:
            raise ScheduleError(f"{where}.{key} is missing; add it (allowed keys: {names(allowed)})")
    return dict(d)
