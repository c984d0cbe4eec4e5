"""cryofastar run: particles in, poses and a map out.

Reads a RELION .star or CryoSPARC .cs particle file, estimates every particle's pose in one forward
pass of the pose model, reconstructs two independent half maps and the full map, and writes them
with a STAR (and .cs) file of the poses, plots and report.json to the output folder. The inputs are
never modified.

Settings: the defaults shown below, then a YAML file given with --config (the same names with
underscores, e.g. refine_iters: 3), then the flags on the command line, each overriding the one before.

Several processes: torchrun --nproc_per_node N -m cryofastar_core.cli.run ... shares the work over
the processes (CPU, or one GPU per process); the first one writes the outputs. Running again on a
finished output folder does nothing; running again after an interruption resumes.

Exit codes: 0 done (or nothing to do), 2 bad input, 3 bad weights, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 1 unexpected internal error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cryofastar_core.job import JOB_OPTIONS as _OPTIONS, JobConfig, run

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


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="estimate poses feed-forward and reconstruct a map",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with any of these settings (names with underscores, e.g. refine_iters); flags "
                        "given here override it")
    p.add_argument("--particles", type=Path, default=None, help="RELION .star (3.0/3.1+) or CryoSPARC .cs (required "
                                                                 "here or in --config)")
    p.add_argument("--o", dest="out_dir", type=Path, default=None, help="output folder (required here or in --config)")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="folder the image paths in the particle file are relative to (default: the working "
                        "directory, then the particle file's folder)")
    add_job_arguments(p)
    # "Not given" must be told apart from a default so that --config values are not overridden by defaults.
    p.set_defaults(func=_main, **{name: None for name in JOB_OPTIONS})


def command_line_settings(args: argparse.Namespace) -> dict:
    """The JobConfig settings given on the command line (None where a flag was not given)."""
    names = ("particles", "out_dir", "project_dir", *JOB_OPTIONS)
    return {name: getattr(args, name, None) for name in names}


def _main(args: argparse.Namespace) -> int:
    from cryofastar_core.cli.progress import terminal_progress
    from cryofastar_core.runtime.communicator import dist_env, init_from_env, shutdown
    from cryofastar_core.job.step_file import build_job_config

    env = dist_env()
    cfg = build_job_config(args.config, command_line_settings(args))
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    comm, _ = init_from_env(cfg.device)
    try:
        report = run(cfg, progress=terminal_progress(), comm=comm)  # the engine reports on rank 0 only
    finally:
        shutdown()
    if comm.is_main:
        print(f"{report.n_kept} of {report.n_particles} particles kept; {report.resolution_text}; outputs in "
              f"{cfg.out_dir} (report.json, map.mrc, fsc.png, viewing_directions.png, confidence.png)")
        print(*report.verdict_lines, sep="\n")
    return 0


if __name__ == "__main__":
    from cryofastar_core.cli.main import main

    sys.exit(main(["run", *sys.argv[1:]]))
