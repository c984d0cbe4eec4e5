"""``cryofastar run``: particles in, poses and a map out (see :mod:`cryofastar_core.job`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cryofastar_core.job import JobConfig, run


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job's options, shared by ``run`` and ``demo``."""
    p.add_argument("--weights", default="default", help="shipped weights name or a weights file (default: default)")
    p.add_argument("--box", type=int, default=None, help="model box; must match the weights (default: the weights')")
    p.add_argument("--views", type=int, default=128, help="views per forward pass: reference + anchors + new (default 128)")
    p.add_argument("--candidates", type=int, default=64, help="reference candidates scored (default 64)")
    p.add_argument("--anchors", type=int, default=8, help="anchor particles in every pass (default 8)")
    p.add_argument("--refine-iters", type=int, default=0, help="local refinement iterations after the feed-forward poses")
    p.add_argument("--keep-fraction", type=float, default=None, help="keep only this fraction of most confident particles")
    p.add_argument("--min-confidence", type=float, default=None, help="drop particles below this mean confidence")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="random seed (candidates, chunks, half sets)")


def job_config(args: argparse.Namespace, particles: Path, out_dir: Path) -> JobConfig:
    return JobConfig(particles=particles, out_dir=out_dir, weights=args.weights,
                     project_dir=getattr(args, "project_dir", None), box=args.box, views=args.views,
                     candidates=args.candidates, anchors=args.anchors, refine_iters=args.refine_iters,
                     keep_fraction=args.keep_fraction, min_confidence=args.min_confidence, device=args.device,
                     threads=args.threads, seed=args.seed)


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="estimate poses feed-forward and reconstruct a map",
                              description=__doc__)
    p.add_argument("--particles", type=Path, required=True, help="RELION .star (3.0/3.1+) or CryoSPARC .cs")
    p.add_argument("--o", dest="out_dir", type=Path, required=True, help="output folder")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="folder image paths are relative to (default: working directory, then the file's folder)")
    add_job_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = run(job_config(args, args.particles, args.out_dir))
    print(f"{report.n_kept} of {report.n_particles} particles kept; gold-standard resolution "
          f"{report.resolution_0143:.2f} Å; outputs in {args.out_dir} (report.json, map.mrc, fsc.png, "
          f"viewing_directions.png, confidence.png)")
    return 0
