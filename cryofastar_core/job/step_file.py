"""A whole ``cryofastar run`` in one YAML file (an unattended pipeline step).

Keys are the :class:`cryofastar_core.job.JobConfig` field names: ``particles``, ``out_dir``, ``project_dir``
and one per declared job option (``weights``, ``views``, ..., :mod:`cryofastar_core.job.options`), typed
as declared; ``o`` is accepted for ``out_dir`` (as ``--o``) and dashes for underscores
(``keep-fraction``). Relative paths in the file are relative to the file's folder, so a step file works
from any working directory. Command-line flags override the file, which overrides the defaults.
Unknown keys and values of the wrong type are :class:`InputError` naming the file and the key (the
reading and typing rules are :mod:`cryofastar_core.runtime.yaml_config`'s, shared with training configs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.job.config import JOB_OPTIONS, JobConfig
from cryofastar_core.runtime.yaml_config import coerce_settings, read_yaml_mapping

ALIASES = {"o": "out_dir", "out": "out_dir"}
REQUIRED = ("particles", "out_dir")
# The keys a step file may hold (JobConfig's fields): the paths, then every declared job option.
STEP_KEYS = ("particles", "out_dir", "project_dir", *(opt.name for opt in JOB_OPTIONS))


def read_step_file(path: str | Path) -> dict[str, Any]:
    """Settings from a step file, checked and converted (paths made absolute); only the keys it holds."""
    path = Path(path)
    settings = coerce_settings(JobConfig, read_yaml_mapping(path, "step file"), path, aliases=ALIASES)
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
