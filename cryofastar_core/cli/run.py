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

from cryofastar_core.job import JobConfig, run

# The command line's name of each JobConfig field, for errors the engine raises in field names.
CLI_NAMES = {**{name: "--" + name.replace("_", "-") for name in JobConfig.__dataclass_fields__}, "out_dir": "--o"}

# JobConfig fields set by add_job_arguments (same dest names).
JOB_OPTIONS = ("weights", "box", "views", "candidates", "anchors", "chunks_per_batch", "refine_iters", "refine_global",
               "keep_fraction", "min_confidence", "device", "threads", "seed")


def add_job_arguments(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The job's options, shared by ``run`` and ``demo``; the help shows the defaults really used:
    JobConfig's, or the caller's ``defaults`` (field name -> value) where given."""
    def _default(name: str) -> object:
        return (defaults or {}).get(name, JobConfig.__dataclass_fields__[name].default)

    p.add_argument("--weights", default=_default("weights"),
                   help=f"shipped weights name or a weights file (default: {_default('weights')})")
    p.add_argument("--box", type=int, default=None, help="model box; must match the weights (default: the weights' box)")
    p.add_argument("--views", type=int, default=_default("views"),
                   help=f"images per forward pass: reference + anchors + new particles (default: {_default('views')})")
    p.add_argument("--candidates", type=int, default=_default("candidates"),
                   help=f"particles tried as the reference, the best kept (default: {_default('candidates')})")
    p.add_argument("--anchors", type=int, default=_default("anchors"),
                   help=f"particles repeated in every pass to tie the passes together (default: {_default('anchors')})")
    p.add_argument("--chunks-per-batch", type=int, default=_default("chunks_per_batch"),
                   help=f"passes run together; more is faster and uses more memory (default: {_default('chunks_per_batch')})")
    p.add_argument("--refine-iters", type=int, default=_default("refine_iters"),
                   help=f"local refinement iterations after the feed-forward poses (default: {_default('refine_iters')})")
    p.add_argument("--refine-global", action=argparse.BooleanOptionalAction, default=_default("refine_global"),
                   help="when refining, first assign every particle globally (15 deg grid) against the "
                        "feed-forward map, so poses tens of degrees off can still be refined (default: on)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="keep only this fraction of the most confident particles, e.g. 0.8 (default: keep all)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="drop particles whose confidence (0-1, the STAR column rlnMaxValueProbDistribution) is below "
                        "this (default: keep all)")
    p.add_argument("--device", default=_default("device"),
                   help=f"auto (a GPU if present), cpu or cuda (default: {_default('device')})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: what torch chooses)")
    p.add_argument("--seed", type=int, default=_default("seed"),
                   help=f"random seed for the reference candidates and the passes (default: {_default('seed')})")


def job_config(args: argparse.Namespace, particles: Path, out_dir: Path) -> JobConfig:
    return JobConfig(particles=particles, out_dir=out_dir, weights=args.weights,
                     project_dir=getattr(args, "project_dir", None), box=args.box, views=args.views,
                     candidates=args.candidates, anchors=args.anchors,
                     chunks_per_batch=getattr(args, "chunks_per_batch", 4), refine_iters=args.refine_iters,
                     refine_global=args.refine_global,
                     keep_fraction=args.keep_fraction, min_confidence=args.min_confidence, device=args.device,
                     threads=args.threads, seed=args.seed)


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
    from cryofastar_core.inference.distributed import dist_env, init_from_env, shutdown
    from cryofastar_core.job_config import build_job_config

    env = dist_env()
    cfg = build_job_config(args.config, command_line_settings(args))
    if env.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    comm, _ = init_from_env(cfg.device)
    try:
        report = run(cfg, comm=comm)
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
