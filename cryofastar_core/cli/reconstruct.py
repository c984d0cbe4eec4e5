"""``cryofastar reconstruct``: half maps, map and gold-standard FSC from posed particles (see
:mod:`cryofastar_core.reconstruct.from_particles`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryofastar_core.reconstruct import from_particles
from cryofastar_core.reconstruct.from_particles import ReconstructConfig, reconstruct_particles


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reconstruct", help="back-project particles with known poses into half maps and a map; gold-standard FSC",
        description=from_particles.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=Path, required=True, help="particle file with poses (.star or .cs)")
    p.add_argument("--o", dest="out_dir", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF (images are back-projected as they are)")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="folder that image paths are relative to (RELION's project folder; default: the working "
                        "directory, then the particle file's folder)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--chunk-size", type=int, default=256, help="particles read and inserted at a time")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = ReconstructConfig(particles=args.particles, out_dir=args.out_dir, project_dir=args.project_dir,
                            ctf=not args.no_ctf, threads=args.threads, chunk_size=args.chunk_size, device=args.device)
    res = reconstruct_particles(cfg)
    print(f"Reconstructed {res.n_particles} particles in {res.seconds:.1f} s -> {res.out_dir}")
    above = bool(np.all(res.fsc[1:] >= 0.143))
    print(f"Gold-standard resolution (half-map FSC = 0.143): {res.resolution_0143:.2f} Å "
          f"(Nyquist {2 * res.apix:.2f} Å{'; the FSC stays above 0.143 up to Nyquist' if above else ''})")
    return 0


