"""Strong scaling of ``cryofastar run`` over processes (torchrun): particles/s of the pose stage and of the
reconstruction, one process against several on the same data.

CPU (default): every process gets ``OMP_NUM_THREADS=1`` (``--threads-per-process``), so 1 vs 2 processes
compares 1 core with 2 cores. GPU (``--device cuda``): one process per GPU, up to the GPUs present.

    PYTHONPATH=. python bench/bench_scaling.py                                   # small CPU run, 1 and 2
    PYTHONPATH=. python bench/bench_scaling.py --n 2000 --box 64 --procs 1 2 --json scaling.json
    PYTHONPATH=. python bench/bench_scaling.py --device cuda --procs 1 2 4 8 --n 200000 --model-size S

Particles are simulated from the shipped demo map (3ENL, CTF, SNR 1); the weights are the shipped default
when given (``--weights default``) or a randomly initialised model of ``--model-size`` (the speed does not
depend on the values of the weights). Timings are rank 0's stage wall times from ``report.json`` (they
include waiting for the other ranks), plus the whole command's wall time (process start-up included).
The poses and maps of every process count are checked against the one-process run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _weights(args: argparse.Namespace, folder: Path) -> str:
    if args.weights:
        return args.weights
    import torch

    from cryofastar_core.model import CryoFastAR, model_config, save_weights

    torch.manual_seed(0)
    path = folder / f"random_{args.model_size}_box{args.box}.pt"
    save_weights(CryoFastAR(model_config(args.model_size, args.box)), path, extra={"note": "random, for timing"})
    return str(path)


def _simulate(args: argparse.Namespace, folder: Path) -> Path:
    from cryofastar_core.cli.demo import DEMO_MAP
    from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

    return simulate(SimulateConfig(out_dir=folder / "particles", n=args.n, box=args.box, snr=1.0, seed=1,
                                   map_path=DEMO_MAP, ctf=True, max_shift=2.0))


def _run(nproc: int, star: Path, weights: str, out: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg",
               OMP_NUM_THREADS=str(args.threads_per_process))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cryofastar_core.cli.run", "--particles", str(star), "--o", str(out), "--weights", weights,
           "--views", str(args.views), "--candidates", str(args.candidates), "--anchors", str(args.anchors),
           "--chunks-per-batch", str(args.chunks_per_batch), "--device", args.device]
    if args.device == "cpu":
        cmd += ["--threads", str(args.threads_per_process)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=star.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    t = report["timings_s"]
    n = report["n_particles"]
    return {"processes": nproc, "poses_s": t["poses"], "reconstruct_s": t["reconstruct"], "total_s": t["total"],
            "wall_s": round(wall, 2), "poses_particles_per_s": round(n / t["poses"], 1),
            "reconstruct_particles_per_s": round(report["n_kept"] / t["reconstruct"], 1)}


def _agreement(one: Path, other: Path, project: Path) -> dict:
    import mrcfile

    from cryofastar_core.io import read_particles

    a, b = read_particles(one / "particles.star", project), read_particles(other / "particles.star", project)
    x, y = mrcfile.read(one / "map.mrc"), mrcfile.read(other / "map.mrc")
    return {"max_rotation_diff": float(np.abs(a.rotations - b.rotations).max()),
            "max_shift_diff_px": float(np.abs(a.shifts - b.shifts).max()),
            "map_max_rel_diff": float(np.abs(x - y).max() / np.abs(x).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=600, help="particles (default 600)")
    p.add_argument("--box", type=int, default=64, help="particle and model box (default 64)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads-per-process", type=int, default=1, help="OMP/torch threads per process (CPU)")
    p.add_argument("--weights", default=None, help="weights name or file (default: random weights, --model-size)")
    p.add_argument("--model-size", default="XS", help="size of the random model (default XS)")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--anchors", type=int, default=8)
    p.add_argument("--chunks-per-batch", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        args.procs = [k for k in args.procs if k <= gpus] or [1]
    with tempfile.TemporaryDirectory(prefix="cryofastar_scaling_") as tmp:
        folder = Path(tmp)
        star = _simulate(args, folder)
        weights = _weights(args, folder)
        rows, outs = [], {}
        for k in args.procs:
            outs[k] = folder / f"run_{k}"
            rows.append(_run(k, star, weights, outs[k], args))
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]
        for row in rows:
            row["poses_speedup"] = round(base["poses_s"] / row["poses_s"], 2)
            row["reconstruct_speedup"] = round(base["reconstruct_s"] / row["reconstruct_s"], 2)
            row.update(_agreement(outs[base["processes"]], outs[row["processes"]], star.parent))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\n{'procs':>5} {'poses s':>8} {'poses p/s':>10} {'x':>5} {'recon s':>8} {'recon p/s':>10} {'x':>5} "
          f"{'wall s':>7}  agreement with 1 process")
    for r in rows:
        print(f"{r['processes']:>5} {r['poses_s']:>8.2f} {r['poses_particles_per_s']:>10.1f} {r['poses_speedup']:>5.2f} "
              f"{r['reconstruct_s']:>8.2f} {r['reconstruct_particles_per_s']:>10.1f} {r['reconstruct_speedup']:>5.2f} "
              f"{r['wall_s']:>7.1f}  rot {r['max_rotation_diff']:.1e}, shift {r['max_shift_diff_px']:.1e} px, "
              f"map {r['map_max_rel_diff']:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
