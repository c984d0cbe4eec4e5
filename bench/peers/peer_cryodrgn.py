"""cryoDRGN's homogeneous ab initio (``abinit_homo_old`` in 4.3.1: the ``--zdim 0`` path of
branch-and-bound pose search with a neural volume).

Pose convention (checked against cryoDRGN's own ``parse_pose_star``: ``utils.R_from_relion`` of
RELION Euler angles equals the transpose of ours, see tests/test_bench_harness.py): a pose file
``(rot (N, 3, 3), trans (N, 2))`` holds ``rot = R^T`` (RELION's matrix ``A``) and
``trans = origin_px / D`` (fraction of the box, RELION origin sign), so ``R = rot^T`` and
``shift = trans * D``.
"""
from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np

from bench.peers.common import MethodRun, Poses, run_stages, thread_env

NAME = "cryodrgn"
RUNNER = Path(__file__).with_name("cryodrgn_runner.py")


def check() -> str | None:
    if importlib.util.find_spec("cryodrgn") is None:
        return "cryodrgn not installed (pip install --no-deps cryodrgn==4.3.1; see bench/README.md)"
    return None


def poses_from_cryodrgn(rot: np.ndarray, trans: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """cryoDRGN ``(rot, trans)`` → internal ``(R (N, 3, 3), shift (N, 2) px)``."""
    return np.swapaxes(np.asarray(rot, np.float64), -1, -2), np.asarray(trans, np.float64) * box


def poses_to_cryodrgn(R: np.ndarray, shift: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`poses_from_cryodrgn`."""
    return np.swapaxes(np.asarray(R, np.float64), -1, -2), np.asarray(shift, np.float64) / box


def run(dataset_dir: Path, work_dir: Path, threads: int, timeout: float, *, epochs: int = 30,
        pretrain: int = 10000, max_shift: float = 2.0, extra: list | None = None) -> MethodRun:
    work_dir.mkdir(parents=True, exist_ok=True)
    star = (dataset_dir / "particles.star").resolve()
    ctf = (work_dir / "ctf.pkl").resolve()
    out = (work_dir / "abinit").resolve()
    t_extent = max(2, int(np.ceil(max_shift)) + 2)
    stages = [
        ([sys.executable, RUNNER, "parse_ctf_star", star, "-o", ctf], work_dir),
        # --uninvert-data: our particles are bright on dark (RELION's convention); cryoDRGN inverts by default.
        ([sys.executable, RUNNER, "abinit_homo_old", star, "--datadir", dataset_dir.resolve(), "--ctf", ctf, "-o", out,
          "--uninvert-data", "-n", epochs, "--pretrain", pretrain, "--t-extent", t_extent, "--seed", 0,
          "--no-amp", *(extra or [])], work_dir),
    ]
    run = MethodRun(settings={"epochs": epochs, "pretrain": pretrain, "t_extent": t_extent, "extra": extra or []})
    if not run_stages(run, stages, timeout, thread_env(threads), work_dir / "log.txt"):
        return run
    with open(out / "pose.pkl", "rb") as f:
        rot, trans = pickle.load(f)
    from cryofastar_core.io import read_map

    box = read_map(dataset_dir / "truth.mrc")[0].shape[-1]
    R, shift = poses_from_cryodrgn(rot, trans, box)
    run.poses = Poses(indices=np.arange(len(R)), rotations=R, shifts=shift)
    return run
