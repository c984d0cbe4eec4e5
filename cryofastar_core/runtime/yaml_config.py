"""YAML settings files into typed dataclasses: the one loader for step files and training configs.

:func:`read_yaml_mapping` reads a file into a mapping; :func:`coerce_settings` turns the keys a mapping
holds into a dataclass's typed fields, and :func:`build_dataclass` builds the dataclass itself (nested
dataclasses, lists, tuples and ``Literal`` choices included). Every problem is an :class:`InputError`
naming the file and the key as the user wrote it, with a fix.

Rules, the same for every file:

- keys are the dataclass's field names; dashes are read as underscores (``keep-fraction``), and a caller
  may add aliases (``o`` for ``out_dir``); an unknown key is refused with the nearest field name as a
  suggestion, a key given twice (a name and its alias) too;
- ``null`` (or an empty value) only where the field's type allows ``None`` (an empty ``dict`` field reads
  as ``{}``);
- ``int`` fields take whole numbers only (not ``true``, not ``16.5``); ``float`` fields take numbers and
  numeric text (PyYAML reads ``1e-4``, without a dot, as text); ``bool`` fields take ``true``/``false``
  only; ``str`` fields take text or a number (as its text); ``Path`` fields take text, relative to the
  file's folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from cryofastar_core.runtime.errors import InputError


def read_yaml_mapping(path: str | Path, what: str = "settings file") -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping); InputError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(path, None, f"cannot read the {what} ({exc.strerror or exc})",
                         "pass an existing YAML file to --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(path, None, f"not valid YAML ({exc})", "fix the YAML syntax (key: value per line)") from None
    if data is None:
        return {}
    return require_mapping(data, path)


def require_mapping(data: Any, path: str | Path | None, key: str | None = None) -> dict[str, Any]:
    """``data`` as a dict, or InputError: a settings file (or the section at ``key``) must be a mapping."""
    if not isinstance(data, Mapping):
        what = "the file" if key is None else "this section"
        raise InputError(path, key, f"{what} must be a mapping of settings (key: value), got {type(data).__name__}",
                         "write one `key: value` per line")
    return dict(data)


def coerce_settings(cls: type, data: Any, path: str | Path | None, *, prefix: str = "",
                    aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings ``data`` holds, keyed by ``cls``'s field names and converted to their types.

    Only the keys present are returned (defaults and required fields are the caller's, or
    :func:`build_dataclass`'s). ``prefix`` is prepended to the keys in errors (``stages[0].``).
    """
    data = require_mapping(data, path, prefix.rstrip(".") or None)
    aliases = aliases or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        shown = f"{prefix}{raw_key}"
        key = str(raw_key).replace("-", "_")
        key = aliases.get(key, key)
        if key not in names:
            raise InputError(path, shown, "unknown setting", _suggest(str(raw_key), names, aliases))
        if key in settings:
            raise InputError(path, shown, "given twice (an alias and its name?)", "keep one of them")
        settings[key] = coerce_value(value, hints[key], path, shown)
    return settings


def build_dataclass(cls: type, data: Any, path: str | Path | None, *, prefix: str = "",
                    aliases: Mapping[str, str] | None = None):
    """``cls`` from ``data`` (see :func:`coerce_settings`); a field without a default must be given."""
    settings = coerce_settings(cls, data, path, prefix=prefix, aliases=aliases)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in settings:
            raise InputError(path, f"{prefix}{f.name}", "missing", f"add '{f.name}:'")
    return cls(**settings)


def coerce_value(value: Any, hint: Any, path: str | Path | None, key: str) -> Any:
    """``value`` (as YAML read it) converted to the type ``hint``; InputError naming ``path`` and ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, path, key)
    if value is None:
        return _coerce_empty(hint, origin, path, key)
    if origin is Literal:
        return _coerce_literal(value, args, path, key)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path, prefix=f"{key}.")
    if origin is list or origin is tuple or hint is dict or origin is dict:
        return _coerce_container(value, hint, origin, args, path, key)
    return _coerce_scalar(value, hint, path, key)


def _coerce_union(value: Any, args: tuple[Any, ...], path: str | Path | None, key: str) -> Any:
    """``value`` as the first member of the union ``args`` that takes it (``None`` where the union allows it);
    else the first member's error (its fix extended by ``, or null`` for an optional field)."""
    optional = type(None) in args
    if value is None and optional:
        return None
    first: InputError | None = None
    for inner in (a for a in args if a is not type(None)):
        try:
            return coerce_value(value, inner, path, key)
        except InputError as exc:
            first = first or exc
    assert first is not None
    if optional and first.field == key:
        raise InputError(first.path, first.field, first.problem, f"{first.fix}, or null") from None
    raise first


def _coerce_empty(hint: Any, origin: Any, path: str | Path | None, key: str) -> dict:
    """An empty (``null``) value: ``{}`` for a ``dict`` field, else InputError."""
    if hint is dict or origin is dict:
        return {}
    raise InputError(path, key, "must not be empty", f"give {_expected(hint)}")


def _coerce_literal(value: Any, args: tuple[Any, ...], path: str | Path | None, key: str) -> Any:
    """``value`` as one of the ``Literal`` choices ``args`` (YAML's ``true``/``false`` read as text)."""
    value = str(value).lower() if isinstance(value, bool) else value
    if value not in args:
        raise InputError(path, key, f"must be one of {list(args)}, got {value!r}", f"use one of {list(args)}")
    return value


def _coerce_container(value: Any, hint: Any, origin: Any, args: tuple[Any, ...], path: str | Path | None,
                      key: str) -> list | tuple | dict:
    """``value`` as a ``list``, ``tuple`` (items converted to their types) or ``dict`` (taken as is)."""
    if origin is list:
        if not isinstance(value, list):
            raise _bad(value, path, key, "is not a list", "write a list: [a, b] or one `- item` per line")
        return [coerce_value(v, args[0], path, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(value, path, key, f"is not a list of {len(args)} values", f"write a list of {len(args)} values")
        return tuple(coerce_value(v, a, path, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if not isinstance(value, Mapping):
        raise _bad(value, path, key, "is not a mapping", "write it as key: value lines")
    return dict(value)


def _coerce_scalar(value: Any, hint: Any, path: str | Path | None, key: str) -> Any:
    """``value`` as a ``bool``, ``int``, ``float``, ``str`` or ``Path``; any other type takes it as is."""
    if hint is bool:
        if not isinstance(value, bool):
            raise _bad(value, path, key, "is not true or false", "write true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(value, path, key, "is not a whole number", "give an integer")
        return value
    if hint is float:
        return _coerce_float(value, path, key)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _bad(value, path, key, "is not text", "give a text value")
        return str(value)
    if hint is Path:
        return _coerce_path(value, path, key)
    return value


def _coerce_float(value: Any, path: str | Path | None, key: str) -> float:
    """A number or numeric text (PyYAML reads ``1e-4`` as text) as a ``float``; not ``true``/``false``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise _bad(value, path, key, "is not a number", "give a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(value, path, key, "is not a number", "give a number")
    return float(value)


def _coerce_path(value: Any, path: str | Path | None, key: str) -> Path:
    """Non-empty text as a ``Path`` (``~`` expanded), a relative one taken from the folder of the file ``path``."""
    if not isinstance(value, str) or not value:
        raise _bad(value, path, key, "is not a path", "write the path as text")
    p = Path(value).expanduser()
    if p.is_absolute() or path is None:
        return p
    return Path(path).resolve().parent / p


def _bad(value: Any, path: str | Path | None, key: str, problem: str, fix: str) -> InputError:
    """The InputError for a ``value`` of the wrong kind: ``problem`` follows the value as YAML read it."""
    return InputError(path, key, f"{value!r} {problem}", fix)


def _expected(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a text value", Path: "a path"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping (key: value lines)"
    return "a value"


def _suggest(key: str, names: list[str], aliases: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), [*names, *aliases], n=1, cutoff=0.6)
    listed = ", ".join(sorted(names))
    if aliases:
        listed += " (or " + ", ".join(f"{a} for {n}" for a, n in sorted(aliases.items())) + ")"
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}use one of: {listed}"
