"""The job's options on a command line: one flag per declared option, shared by ``cryofastar run``,
``cryofastar demo`` and ``cryofastar-cryosparc``, and the flag name of each JobConfig field for errors."""
from __future__ import annotations

import argparse
from pathlib import Path

from cryofastar_core.job import JOB_OPTIONS as _OPTIONS, JobConfig

# The command line's name of each JobConfig field, for errors the engine raises in field names.
CLI_NAMES = {**{name: "--" + name.replace("_", "-") for name in JobConfig.__dataclass_fields__}, "out_dir": "--o"}

# JobConfig fields set by add_job_arguments (same dest names): every declared job option.
JOB_OPTIONS = tuple(opt.name for opt in _OPTIONS)


def add_job_arguments(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The job's options, shared by ``run``, ``demo`` and ``cryofastar-cryosparc``, one flag per declared
    option (cryofastar_core.job.options): ``--chunks-per-batch`` for ``chunks_per_batch``, and
    ``--name/--no-name`` for a yes/no option. The help shows the defaults really used: the declared ones,
    or the caller's ``defaults`` (field name -> value) where given."""
    for opt in _OPTIONS:
        default = (defaults or {}).get(opt.name, opt.default)
        kind = {"action": argparse.BooleanOptionalAction} if opt.type is bool else {"type": opt.type}
        p.add_argument(opt.flag, dest=opt.name, default=default, help=opt.help_text(default).replace("%", "%%"), **kind)


def job_config(args: argparse.Namespace, particles: Path, out_dir: Path) -> JobConfig:
    return JobConfig(particles=particles, out_dir=out_dir, project_dir=getattr(args, "project_dir", None),
                     **{name: getattr(args, name) for name in JOB_OPTIONS})


def command_line_settings(args: argparse.Namespace) -> dict:
    """The JobConfig settings given on the command line (None where a flag was not given)."""
    names = ("particles", "out_dir", "project_dir", *JOB_OPTIONS)
    return {name: getattr(args, name, None) for name in names}
