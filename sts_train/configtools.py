"""Strict mapping -> frozen dataclass conversion, shared by every config in the toolkit.

YAML maps onto dataclasses key for key: unknown keys, wrong types and missing required keys
are errors that name the key path and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sts_train.errors import StsError

T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against a simple annotation; returns (ok, converted value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp, *_rest) = typing.get_args(tp)
        out = []
        for item in value:
            ok, conv = _type_ok(item, item_tp)
            if not ok:
                return False, value
            out.append(conv)
        return True, tuple(out)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Raises:
        StsError: not a mapping, unknown key, wrong type, missing required key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StsError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be bools (on/off) or numbers
    if unknown:
        raise StsError(
            f"{where}.{unknown[0]}: unknown key; allowed keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        tp = hints[name]
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise StsError(f"{key}: required key is missing; add it")
            continue
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_mapping(tp, value, key)
            continue
        args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if args and value is not None:
            kwargs[name] = from_mapping(args[0], value, key)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            raise StsError(f"{key} = {value!r} has the wrong type; expected {_type_name(tp)}")
        if isinstance(conv, float) and not math.isfinite(conv):
            raise StsError(f"{key} = {value!r} is not a finite number; give a finite value")
        kwargs[name] = conv
    try:
        return cls(**kwargs)
    except StsError as exc:
        msg = str(exc)
        raise StsError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def to_mapping(obj: Any) -> Any:
    """Dataclass (nested) -> plain dicts/lists for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | Path, what: str, error: type[StsError] = StsError) -> Any:
    """Read a YAML file; a folder, a missing file, non-UTF-8 bytes or broken YAML raise one line.

    Args:
        what: how the messages name the expected file, e.g. ``"schedule.yaml"``.
        error: the :class:`StsError` subclass to raise.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; pass the path of the {what} inside it")
    if not path.is_file():
        raise error(f"{path}: no such file; pass the path of a {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise error(f"{path}: broken YAML{at}: {problem}; fix the file's syntax") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; pass the path of a {what}") from None


def check_replaceable(folder: str | Path, error: type[StsError] = StsError) -> Path:
    """Refuse, before anything is deleted, a folder that ``--overwrite`` must not replace: an
    existing file, or the current folder or one that contains it. Returns the resolved path."""
    given, resolved = Path(folder), Path(folder).resolve()  # resolved: "." has no name
    if given.is_symlink():
        raise error(f"{given}: is a symbolic link; pass the folder it points to ({resolved}) or a new folder")
    if resolved.exists() and not resolved.is_dir():
        raise error(f"{given}: exists and is not a folder; choose a new folder")
    check_parents(given, error)
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise error(f"{given}: is or contains the current folder; choose a new folder")
    return resolved


def check_overwritable(folder: str | Path, owned: bool, what: str, error: type[StsError] = StsError) -> None:
    """``--overwrite`` replaces only what this tool wrote: refuse a non-empty folder that is not
    ``owned`` (the caller's check of the tool's own record in it, e.g. a data set's info file)."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not owned:
        raise error(f"{folder}: holds files but no {what}, and --overwrite would delete them; "
                    "choose a new or empty folder")


def json_field(path: str | Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``, or None (no file, not JSON, not an object)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def check_file_target(path: str | Path, error: type[StsError] = StsError, example: str | None = None,
                      overwrite: bool = True) -> Path:
    """Refuse an output file path that is a folder, whose parent is a file, or that exists
    (unless ``overwrite``). ``example``: a file name the message suggests inside the folder."""
    path = Path(path)
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else ""
        raise error(f"{path}: is a folder; pass a file path{hint}")
    if path.exists() and not overwrite:
        raise error(f"{path}: file exists; choose another path or pass --overwrite")
    check_parents(path, error)
    return path


def check_parents(given: str | Path, error: type[StsError], inside: bool = False) -> None:
    """Refuse a path whose nearest existing parent is a file or a folder this user cannot write.

    ``inside``: the tool writes inside the folder ``given`` (not beside it), so when that folder
    exists it is the one that must be writable, not its parent.
    """
    path = Path(given).absolute()
    for folder in ([path] if inside else []) + list(path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise error(f"{given}: {folder} is a file, not a folder; choose another path")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise error(f"{given}: cannot write in {folder} (permission denied); choose a writable path")
            return


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path = check_file_target(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StsError(f"{path}: cannot write ({exc.strerror or exc}); choose a writable path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not publish a file whose bytes are not on disk
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dump_yaml(data: Any, path: str | Path, overwrite: bool = True) -> Path:
    """Atomically write ``data`` (dataclass or mapping) as YAML, keys in declaration order."""
    text = yaml.safe_dump(to_mapping(data), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text, overwrite=overwrite)
