"""``cryofastar simulate``: a synthetic particle set with known poses (see
:mod:`cryofastar_core.simulation.particle_sets`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cryofastar_core.simulation import particle_sets as simulate_particles
from cryofastar_core.cli.progress import terminal_progress
from cryofastar_core.simulation.particle_sets import TRUTH_NAME, SimulateConfig, simulate


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate a particle set with known poses (RELION 3.1 STAR + MRC stacks)",
        description=simulate_particles.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--map", type=Path, help="density map (.mrc) to project")
    src.add_argument("--model", type=Path, help="atomic model (.cif/.pdb) to turn into a map first")
    p.add_argument("--n", type=int, required=True, help="number of particles")
    p.add_argument("--box", type=int, required=True, help="image box size (px)")
    p.add_argument("--apix", type=float, default=None,
                   help="pixel size (Å/px). With --map the default keeps the map's field of view "
                        "(map voxel size x map box / --box, i.e. the map's own voxel size when the boxes agree; "
                        "the map is Fourier-cropped/padded to it). Required with --model.")
    p.add_argument("--resolution", type=float, default=None,
                   help="with --model: resolution (Å) of the simulated map (default: the volume builder's)")
    p.add_argument("--snr", type=float, required=True,
                   help="signal-to-noise ratio: var(clean image over the box) / noise variance; 'inf' = no noise")
    p.add_argument("--ctf", action="store_true", help="apply a CTF (random defocus, astigmatism and angle)")
    p.add_argument("--max-shift", type=float, default=0.0,
                   help="origins drawn uniformly in [-PX, PX] on each axis (px; default 0)")
    p.add_argument("--defocus-range", type=float, nargs=2, default=(5000.0, 30000.0), metavar=("MIN", "MAX"),
                   help="mean defocus drawn uniformly in this range (Å; default 5000 30000)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1, help="fraction (default 0.1)")
    p.add_argument("--seed", type=int, required=True, help="random seed (poses, CTF, noise, half sets)")
    p.add_argument("--chunk-size", type=int, default=500, help="images simulated at a time (bounds memory)")
    p.add_argument("--stack-size", type=int, default=10000, help="images per .mrcs stack (default 10000)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--o", dest="out_dir", type=Path, required=True, help="output folder (created if missing)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = SimulateConfig(
        out_dir=args.out_dir, n=args.n, box=args.box, snr=args.snr, seed=args.seed, map_path=args.map,
        model_path=args.model, apix=args.apix, model_resolution=args.resolution, ctf=args.ctf,
        max_shift=args.max_shift, defocus_min=args.defocus_range[0], defocus_max=args.defocus_range[1],
        voltage=args.voltage, cs=args.cs, amplitude_contrast=args.amplitude_contrast,
        chunk_size=args.chunk_size, stack_size=args.stack_size, device=args.device)
    star = simulate(cfg, progress=terminal_progress(unit="img"))
    print(f"Wrote {cfg.n} particles: {star} (truth map: {star.parent / TRUTH_NAME})")
    return 0


