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

from cryofastar_core.cli.job_flags import JOB_OPTIONS, add_job_arguments, command_line_settings
from cryofastar_core.job import run

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
    # torchrun -m cryofastar_core.cli.run: the script entry reuses the CLI's error handling. It runs after
    # every import has finished, so it closes no import cycle (tests/test_package_structure.py).
    from cryofastar_core.cli.main import main

    sys.exit(main(["run", *sys.argv[1:]]))
