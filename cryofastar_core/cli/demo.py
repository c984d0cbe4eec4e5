"""cryofastar demo: simulate particles of a shipped structure (3ENL, never used in training), run the
main job on them, and compare the poses and the map with the truth.

Writes OUT/simulated (particles and the true map), OUT/run (everything cryofastar run writes) and
OUT/demo_metrics.json (rotation and shift errors, map resolution against the truth)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryofastar_core.evaluation.against_truth import evaluate, format_report
from cryofastar_core.cli.progress import terminal_progress
from cryofastar_core.cli.job_flags import add_job_arguments, job_config
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate
from cryofastar_core.job import run

DEMO_MAP = Path(__file__).resolve().parent.parent / "data" / "demo_3enl_box64.mrc"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demo on simulated particles of a shipped structure",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--o", dest="out_dir", type=Path, default=Path("cryofastar_demo"),
                   help="output folder (default: cryofastar_demo)")
    p.add_argument("--n", type=int, default=1000, help="particles to simulate (default: 1000)")
    p.add_argument("--snr", type=float, default=1.0, help="signal-to-noise ratio (default: 1)")
    p.add_argument("--max-shift", type=float, default=2.0, help="largest simulated shift, px (default: 2)")
    # Fewer views and candidates than `run` so the demo finishes in minutes on 2 CPU cores.
    add_job_arguments(p, defaults={"views": 64, "candidates": 8})
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    sim_dir, run_dir = out / "simulated", out / "run"
    print(f"1/3 simulating {args.n} particles of 3ENL (box 64, SNR {args.snr:g}, CTF) -> {sim_dir}")
    star = simulate(SimulateConfig(out_dir=sim_dir, n=args.n, box=64, snr=args.snr, seed=args.seed + 1,
                                   map_path=DEMO_MAP, ctf=True, max_shift=args.max_shift),
                    progress=terminal_progress(unit="img"))
    print(f"2/3 cryofastar run -> {run_dir}")
    # Image names in the STARs are relative to the simulation folder, the "project folder" here.
    args.project_dir = sim_dir
    report = run(job_config(args, star, run_dir), progress=terminal_progress())
    print("3/3 comparing with the truth")
    result = evaluate(run_dir / "particles.star", star, run_dir / "map.mrc", sim_dir / "truth.mrc",
                      project_dir=sim_dir)
    (out / "demo_metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_report(result))
    print(f"{report.resolution_text}; total {report.timings_s['total']:.0f} s")
    print(f"plots: {run_dir / 'fsc.png'}, {run_dir / 'viewing_directions.png'}, {run_dir / 'confidence.png'}")
    print(*report.verdict_lines, sep="\n")
    return 0
