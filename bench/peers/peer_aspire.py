"""ASPIRE's common-lines ab initio orientations (``CLSyncVoting``), on class averages at low SNR.

Convention: ASPIRE 0.14 projects ``Volume(V).project(R)`` exactly like our ``project(V, R)`` (same
array layout, same matrix; checked in tests/test_bench_harness.py), so its rotations are used as
they are. ASPIRE estimates no per-particle shifts here (translation error: n/a). With class
averages only the class-centre particles get poses (``n_posed`` in the table).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from bench.peers.common import MethodRun, Poses, run_stages, thread_env

NAME = "aspire"
RUNNER = Path(__file__).with_name("aspire_runner.py")


def check() -> str | None:
    if importlib.util.find_spec("aspire") is None:
        return "aspire not installed (pip install aspire==0.14.3; see bench/README.md)"
    return None


def run(dataset_dir: Path, work_dir: Path, threads: int, timeout: float, *, classes: int = 0, n_nbor: int = 10,
        n_theta: int = 72) -> MethodRun:
    work_dir.mkdir(parents=True, exist_ok=True)
    out = (work_dir / "rotations.npz").resolve()
    cmd = [sys.executable, RUNNER, (dataset_dir / "particles.star").resolve(), "--data-folder", dataset_dir.resolve(),
           "--out", out, "--classes", classes, "--n-nbor", n_nbor, "--n-theta", n_theta]
    run = MethodRun(settings={"classes": classes, "n_nbor": n_nbor, "n_theta": n_theta,
                              "selector": "NeighborVariance" if classes else "none (particles)"})
    if not run_stages(run, [(cmd, work_dir)], timeout, thread_env(threads), work_dir / "log.txt"):
        return run
    z = np.load(out)
    run.poses = Poses(indices=z["indices"], rotations=z["rotations"], shifts=None)
    return run
