"""User-facing errors.

An :class:`StsError` is a problem with the user's input (a file, a flag, a config key).
The CLIs print its message as one line and exit with code 2, without a traceback;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StsError(ValueError):
    """Bad input: the message names the problem and the fix, on one line."""


class ScheduleError(StsError):
    """A schedule file or dict breaks the schedule contract."""


class DataError(StsError):
    """A data file (LLaVA JSON, image folder) cannot be read as asked."""


class ModelError(StsError):
    """A model folder or factory size is missing, broken or unsupported."""
