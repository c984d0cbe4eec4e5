"""Shared test fixtures: a tiny asymmetric map, and the real RELION binaries.

RELION 3.1 is our reference implementation. Tests marked ``relion`` must run in CI: when the
binaries are missing the ``relion`` fixture FAILS with a message saying how to install them,
it never skips.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

RELION_BINARIES = ("relion_project", "relion_reconstruct")


def pytest_configure(config):
    config.addinivalue_line("markers", "relion: runs the real RELION 3.1 binaries (must not be skipped)")


def make_asymmetric_map(box: int = 32, n_blobs: int = 30, seed: int = 0) -> np.ndarray:
    """A chiral, asymmetric test density ``(box, box, box)`` float32: Gaussian blobs of 0.8-1.6 px.

    Sharp blobs keep signal up to Nyquist (a smooth map would make high-frequency FSC meaningless).
    All blobs sit inside a sphere of radius ``box / 4`` plus their width, well inside the box.
    """
    rng = np.random.default_rng(seed)
    c = box // 2
    z, y, x = np.mgrid[:box, :box, :box].astype(np.float32) - c
    vol = np.zeros((box, box, box), np.float32)
    r_max = box / 4
    for _ in range(n_blobs):
        while True:
            p = rng.uniform(-r_max, r_max, 3)
            if np.linalg.norm(p) <= r_max:
                break
        s = rng.uniform(0.8, 1.6)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="session")
def tiny_map() -> tuple[np.ndarray, float]:
    """``(volume (32, 32, 32) float32, apix 3.0)``; treat as read-only."""
    vol = make_asymmetric_map(32)
    vol.setflags(write=False)
    return vol, 3.0


@pytest.fixture(scope="session")
def tiny_map_file(tmp_path_factory, tiny_map):
    """The tiny map written as an MRC file (read-only use)."""
    vol, apix = tiny_map
    path = tmp_path_factory.mktemp("maps") / "tiny.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(vol))
        m.voxel_size = apix
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """An untrained, tiny weights file of the shipped kind (line model, phase-flipped input) at box 32,
    for plumbing tests (not accuracy)."""
    import torch

    from cryofastar_core.model import build_model, model_config, save_weights

    torch.manual_seed(0)
    cfg = model_config("XS", 32, arch="lines", n_lines=16, line_samples=16, line_radii=2, enc_dim=32, enc_depth=1,
                       enc_heads=2, dec_dim=32, dec_depth=1, dec_heads=2, denoise_head=False,
                       ctf_correction="phase_flip")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(build_model(cfg), path, extra={"note": "untrained, for plumbing tests"})
    return path


@pytest.fixture(scope="session")
def relion() -> dict[str, str]:
    """Absolute paths of the RELION binaries; fails (not skips) when any is missing."""
    found = {name: shutil.which(name) for name in RELION_BINARIES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(f"RELION binaries not on PATH: {', '.join(missing)}. These tests are required: install "
                    "RELION 3.1 (Debian/Ubuntu: `apt-get install relion`; scripts/test.sh does this) and rerun.",
                    pytrace=False)
    return found


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=None)`` runs ``python -m cryofastar_core.cli.main ARGS`` in a fresh process and
    returns the ``CompletedProcess`` (text output captured; never raises on a non-zero exit)."""

    def run(*args, cwd=None, timeout=600):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MPLBACKEND", "Agg")
        return subprocess.run([sys.executable, "-m", "cryofastar_core.cli.main", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run
