"""Resuming: the fingerprint of a run's inputs, weights and settings, the pose estimate kept in
``out_dir/.cryofastar/`` for a rerun, and the decision a rerun takes (nothing to do, resume, or estimate)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from cryofastar_core.io import ParticleSet
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.job.config import JobConfig, settings_of
from cryofastar_core.job.report import REPORT, Report


STATE_DIR = ".cryofastar"


def decide_resume(out: Path, fingerprint: str) -> tuple[str, object]:
    """Rank 0: nothing to do (``"done"``, the report), resume from saved poses (``"resume"``, the estimate),
    or estimate them (``"estimate"``, None)."""
    out.mkdir(parents=True, exist_ok=True)
    done_report = completed_report(out, fingerprint)
    if done_report is not None:
        return "done", done_report
    # From here on the folder must not look finished: drop an older run's report and stale staging.
    (out / REPORT).unlink(missing_ok=True)
    for stale in out.glob(".cryofastar-staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Poses: resume from a finished inference stage of an interrupted run with the same fingerprint.
    saved = load_poses(poses_file(out), fingerprint)
    if saved is not None:
        return "resume", saved
    if (out / STATE_DIR).exists():
        shutil.rmtree(out / STATE_DIR)  # state of other inputs or settings: restart cleanly
    return "estimate", None


def poses_file(out: Path) -> Path:
    """Where the pose estimate is kept for a resume (with its fingerprint)."""
    return out / STATE_DIR / "poses.npz"


def save_poses(path: Path, fingerprint: str, est: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        np.savez(tmp, fingerprint=fingerprint, **{k: v for k, v in est.items() if k != "fingerprint"})


def run_fingerprint(cfg: JobConfig, particles: ParticleSet, weights: dict) -> str:
    src = Path(particles.source)
    st = src.stat()
    relevant = {k: v for k, v in settings_of(cfg).items() if k not in ("out_dir", "device", "threads", "read_chunk")}
    # "format" changes when saved poses mean something else (2: confidences on the 0-1 scale).
    blob = json.dumps({"format": 2, "source": str(src.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                       "weights": weights["sha256"], "settings": relevant}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def completed_report(out: Path, fingerprint: str) -> Report | None:
    path = out / REPORT
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if payload.pop("fingerprint", None) != fingerprint or not all((out / o).exists() for o in payload.get("outputs", [])):
        return None
    return Report(**payload)


def load_poses(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError):
        return None

