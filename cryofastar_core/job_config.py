"""A whole ``cryofastar run`` in one YAML file (an unattended pipeline step).

Keys are the :class:`cryofastar_core.job.JobConfig` field names (``particles``, ``out_dir``, ``weights``,
``views``, ...); ``o`` is accepted for ``out_dir`` (as ``--o``) and dashes for underscores
(``keep-fraction``). Relative paths in the file are relative to the file's folder, so a step file works
from any working directory. Command-line flags override the file, which overrides the defaults.
Unknown keys and values of the wrong type are :class:`InputError` naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from cryofastar_core.errors import InputError
from cryofastar_core.job import JobConfig

ALIASES = {"o": "out_dir", "out": "out_dir"}
REQUIRED = ("particles", "out_dir")


def job_fields() -> dict[str, str]:
    """JobConfig field name -> its type as written in the class (e.g. ``"int | None"``)."""
    hints = typing.get_type_hints(JobConfig)
    return {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(JobConfig)}


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return hint.__name__


def read_step_file(path: str | Path) -> dict[str, Any]:
    """Settings from a step file, checked and converted (paths made absolute); only the keys it holds."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(path, None, f"cannot read the step file ({exc.strerror or exc})",
                         "pass an existing YAML file to --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(path, None, f"not valid YAML ({exc})", "fix the YAML syntax (key: value per line)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(path, None, "must be a mapping of settings (key: value)", "write one `key: value` per line")
    fields = job_fields()
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in fields:
            raise InputError(path, str(raw_key), "unknown setting",
                             f"use one of: {', '.join(sorted(fields))} (or o for out_dir)")
        if key in settings:
            raise InputError(path, str(raw_key), "given twice (an alias and its name?)", "keep one of them")
        settings[key] = _convert(path, str(raw_key), value, fields[key])
    if isinstance(settings.get("weights"), str):
        settings["weights"] = _weights_value(path, settings["weights"])
    return settings


def _weights_value(path: Path, value: str) -> str:
    """A shipped weights name stays a name; anything else is a file path, relative to the step file."""
    from cryofastar_core.weights import shipped_weights

    if value in shipped_weights() or value == "default":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else path.resolve().parent / p)


def _convert(path: Path, key: str, value: Any, type_name: str) -> Any:
    kinds = type_name.split(" | ")
    if value is None:
        if "None" in kinds:
            return None
        raise InputError(path, key, "must not be empty", f"give a value of type {type_name}")
    if "Path" in kinds:
        if not isinstance(value, str) or not value:
            raise InputError(path, key, f"{value!r} is not a path", "write the path as text")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (path.resolve().parent / p)
    if "int" in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(path, key, f"{value!r} is not a whole number", f"give an integer ({type_name})")
        return value
    if "float" in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(path, key, f"{value!r} is not a number", f"give a number ({type_name})")
        return float(value)
    if "str" in kinds:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(path, key, f"{value!r} is not text", f"give a text value ({type_name})")
        return str(value)
    raise AssertionError(f"JobConfig field of unhandled type {type_name}")


def build_job_config(step_file: str | Path | None, overrides: dict[str, Any]) -> JobConfig:
    """JobConfig from defaults < step file < ``overrides`` (command-line values; None means "not given").

    Validates the result; an invalid value that came from the file is reported against the file and key.
    """
    from_file = read_step_file(step_file) if step_file is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**from_file, **given}
    for key in REQUIRED:
        if merged.get(key) is None:
            flag = "--o" if key == "out_dir" else f"--{key}"
            where = f"{flag} or `{key if key != 'out_dir' else 'o'}:` in the step file" if step_file else flag
            raise InputError(step_file, key, "is required", f"give {where}")
    cfg = JobConfig(**merged)
    try:
        cfg.validate()
    except InputError as exc:
        if step_file is not None and exc.field in from_file and exc.field not in given:
            raise InputError(step_file, exc.field, exc.problem, exc.fix) from None
        raise
    return cfg
