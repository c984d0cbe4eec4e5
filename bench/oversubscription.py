"""Refinement on a shared node: how much slower a pass runs when another process holds a core, with
OpenMP's idle threads spinning (``OMP_WAIT_POLICY=ACTIVE``) or sleeping (``PASSIVE``, what the entry
points ask for: :func:`cryofastar_core.runtime.threads.prefer_passive_wait`).

Each case runs the same workload in a fresh process (the wait policy is read when the OpenMP runtime
starts): one global pass and one local iteration of :func:`cryofastar_core.refine.driver.refine_poses`
on particles simulated from the demo map, timed inside the process. ``--busy K`` starts K pure-Python
spinning processes beside it for the whole case (each wants one core, as another user's job would).

    PYTHONPATH=. python bench/oversubscription.py                     # 2 threads, alone and with 1 busy
    PYTHONPATH=. python bench/oversubscription.py --n 800 --threads 2 --json out.json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPIN = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"


def _workload(star: str, threads: int) -> float:
    """Seconds for one global pass and one local iteration on the particles of ``star``."""
    import numpy as np
    import torch

    from cryofastar_core.io import read_particles
    from cryofastar_core.refine.driver import RefineConfig, refine_poses

    torch.set_num_threads(threads)
    ps = read_particles(star)
    n = len(ps)
    rng = np.random.default_rng(0)
    from cryofastar_core.geometry import random_rotations

    R0 = random_rotations(n, generator=torch.Generator().manual_seed(0)).double()
    half = rng.integers(1, 3, n)
    load = lambda idx: torch.as_tensor(ps.read_images(idx))  # noqa: E731
    cfg = RefineConfig(iterations=1, global_passes=1, centre_origin=False)
    t0 = time.perf_counter()
    refine_poses(load, ps.ctf_params(), float(ps.apix[0]), R0, np.zeros((n, 2)), half, cfg)
    return time.perf_counter() - t0


def _case(star: Path, threads: int, policy: str, busy: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(threads))
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, __file__, "--work", str(star), "--threads", str(threads)],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.work:
        print(_workload(args.work, args.threads))
        return
    from cryofastar_core.cli.demo import DEMO_MAP
    from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        star = simulate(SimulateConfig(out_dir=Path(tmp) / "sim", n=args.n, box=64, snr=1.0, seed=1,
                                       map_path=DEMO_MAP, ctf=True, max_shift=2.0))
        for busy in args.busy:
            for policy in ("ACTIVE", "PASSIVE"):
                sec = _case(star, args.threads, policy, busy)
                rows.append(dict(threads=args.threads, busy=busy, policy=policy, seconds=round(sec, 2)))
                print(json.dumps(rows[-1]), flush=True)
    base = {r["policy"]: r["seconds"] for r in rows if r["busy"] == 0}
    for r in rows:
        if r["policy"] in base:
            r["slowdown_vs_alone"] = round(r["seconds"] / base[r["policy"]], 2)
    print("| threads | busy processes | wait policy | seconds | slowdown vs alone |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['busy']} | {r['policy']} | {r['seconds']} | {r.get('slowdown_vs_alone', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
