"""``cryofastar run``: particles in, poses and a map out (see :mod:`cryofastar_core.job`).

Settings come from the defaults, then ``--config step.yaml`` (JobConfig field names; see
:mod:`cryofastar_core.job_config`), then the command-line flags, each overriding the one before.

Several processes: ``torchrun --nproc_per_node N -m cryofastar_core.cli.run ...`` (or
``-m cryofastar_core.cli.main run ...``) shares the pose chunks and the reconstruction over the ranks
(gloo on CPU, NCCL with one GPU per local rank); rank 0 writes the outputs. A rerun on complete output
does nothing; a rerun after an interruption resumes (exit 0 in both cases).

Exit codes: 0 done (or nothing to do), 2 bad input, 3 bad weights, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 1 unexpected internal error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cryofastar_core.job import JobConfig, run

# JobConfig fields set by add_job_arguments (same dest names).
JOB_OPTIONS = ("weights", "box", "views", "candidates", "anchors", "chunks_per_batch", "refine_iters", "keep_fraction",
               "min_confidence", "device", "threads", "seed")


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job's options, shared by ``run`` and ``demo``."""
    p.add_argument("--weights", default="default", help="shipped weights name or a weights file (default: default)")
    p.add_argument("--box", type=int, default=None, help="model box; must match the weights (default: the weights')")
    p.add_argument("--views", type=int, default=128, help="views per forward pass: reference + anchors + new (default 128)")
    p.add_argument("--candidates", type=int, default=64, help="reference candidates scored (default 64)")
    p.add_argument("--anchors", type=int, default=8, help="anchor particles in every pass (default 8)")
    p.add_argument("--chunks-per-batch", type=int, default=4, help="chunks per forward batch (default 4)")
    p.add_argument("--refine-iters", type=int, default=0, help="local refinement iterations after the feed-forward poses")
    p.add_argument("--keep-fraction", type=float, default=None, help="keep only this fraction of most confident particles")
    p.add_argument("--min-confidence", type=float, default=None, help="drop particles whose confidence (0-1, the rlnMaxValueProbDistribution column) is below this")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="random seed (candidates, chunks, half sets)")


def job_config(args: argparse.Namespace, particles: Path, out_dir: Path) -> JobConfig:
    return JobConfig(particles=particles, out_dir=out_dir, weights=args.weights,
                     project_dir=getattr(args, "project_dir", None), box=args.box, views=args.views,
                     candidates=args.candidates, anchors=args.anchors,
                     chunks_per_batch=getattr(args, "chunks_per_batch", 4), refine_iters=args.refine_iters,
                     keep_fraction=args.keep_fraction, min_confidence=args.min_confidence, device=args.device,
                     threads=args.threads, seed=args.seed)


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="estimate poses feed-forward and reconstruct a map",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML step file with any of these settings (JobConfig names, e.g. particles, o, views); "
                        "flags given here override it")
    p.add_argument("--particles", type=Path, default=None, help="RELION .star (3.0/3.1+) or CryoSPARC .cs (required "
                                                                 "here or in --config)")
    p.add_argument("--o", dest="out_dir", type=Path, default=None, help="output folder (required here or in --config)")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="folder image paths are relative to (default: working directory, then the file's folder)")
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
        print(f"{report.n_kept} of {report.n_particles} particles kept; gold-standard resolution "
              f"{report.resolution_0143:.2f} Å; outputs in {cfg.out_dir} (report.json, map.mrc, fsc.png, "
              f"viewing_directions.png, confidence.png)")
    return 0


if __name__ == "__main__":
    from cryofastar_core.cli.main import main

    sys.exit(main(["run", *sys.argv[1:]]))
