"""Shared plumbing of the benchmark methods: measured subprocesses, predicted poses, evaluation
against the truth, and result records.

A method is a list of commands (stages) run one after the other as subprocesses with one overall
timeout. Each stage is measured with ``os.wait4`` on its own process: wall time, CPU time
(user + system of the process and every descendant it waited for) and peak resident memory
(``ru_maxrss``: the largest of the process and its reaped descendants). The method's totals are
the sums of wall and CPU time and the maximum of the peaks.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Measured:
    """One subprocess: exit code (None when killed on timeout), times in s, peak memory in MiB."""

    cmd: list[str]
    rc: int | None
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    timed_out: bool = False


@dataclass
class Poses:
    """Predicted poses in the internal convention for the particles ``indices`` of the dataset.

    ``rotations`` ``(M, 3, 3)`` image→map frame; ``shifts`` ``(M, 2)`` px (RELION origin meaning) or
    None when the method does not estimate them.
    """

    indices: np.ndarray
    rotations: np.ndarray
    shifts: np.ndarray | None = None


@dataclass
class MethodRun:
    """What a method's ``run`` returns: its stages, its poses (None on failure) and notes."""

    stages: list[Measured] = field(default_factory=list)
    poses: Poses | None = None
    status: str = "ok"  # ok | failed | timeout | not-run
    reason: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages)

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.stages)

    @property
    def max_rss_mib(self) -> float:
        return max((s.max_rss_mib for s in self.stages), default=0.0)


def thread_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of a method's subprocess: every BLAS/OpenMP pool limited to ``threads``."""
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS"):
        env[k] = str(threads)
    env.update(extra or {})
    return env


def run_measured(cmd: list, cwd: Path, timeout: float, env: dict | None = None, log_path: Path | None = None
                 ) -> Measured:
    """Run ``cmd`` in its own process group; kill that group after ``timeout`` s. Output goes to ``log_path``."""
    cmd = [str(c) for c in cmd]
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        if log_path is not None:
            log.write(f"\n$ (cd {cwd} && {' '.join(cmd)})\n".encode())
            log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started (start_new_session)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path is not None:
            log.close()
    return Measured(cmd=cmd, rc=None if timed_out else proc.returncode, wall_s=wall,
                    cpu_s=ru.ru_utime + ru.ru_stime, max_rss_mib=ru.ru_maxrss / 1024.0, timed_out=timed_out)


def run_stages(run: MethodRun, commands: list[tuple[list, Path]], timeout: float, env: dict,
               log_path: Path) -> bool:
    """Run ``(cmd, cwd)`` stages in order within one overall ``timeout``; False (and ``run.status``
    set) when one fails or time runs out."""
    for cmd, cwd in commands:
        left = timeout - run.wall_s
        if left <= 0:
            run.status, run.reason = "timeout", f"did not finish in {timeout / 60:.1f} min"
            return False
        m = run_measured(cmd, cwd, left, env, log_path)
        run.stages.append(m)
        if m.timed_out:
            run.status, run.reason = "timeout", f"did not finish in {timeout / 60:.1f} min"
            return False
        if m.rc != 0:
            run.status, run.reason = "failed", f"{Path(m.cmd[0]).name} exited {m.rc} (see {log_path.name})"
            return False
    return True


def evaluate_poses(dataset_dir: Path, poses: Poses, threads: int = 1) -> dict:
    """Accuracy of ``poses`` against the dataset's truth.

    Rotation error (median, after the best global rotation and hand), translation error (median px;
    None without shifts), and two resolutions of the map our back-projector makes from the predicted
    poses of the posed particles (CTF-corrected, the dataset's own half sets): against the truth map
    (FSC 0.5, after moving the map into the truth frame with the pose fit's ``G``) and half map
    against half map (FSC 0.143). Every method's map is made the same way, so map conventions of
    the peers play no part.
    """
    import torch

    from cryofastar_core.evaluation import metrics
    from cryofastar_core.io import read_map, read_particles
    from cryofastar_core.reconstruct import ParticleChunk, fsc, reconstruct_half_maps, resolution_at

    torch.set_num_threads(threads)
    dataset_dir = Path(dataset_dir)
    truth_ps = read_particles(dataset_dir / "particles.star", dataset_dir)
    idx = np.asarray(poses.indices, dtype=np.int64)
    R_true = np.asarray(truth_ps.rotations)[idx]
    rot = metrics.rotation_errors(poses.rotations, R_true)
    out = {"n_posed": int(len(idx)), "n_particles": int(len(truth_ps)), "rot_median_deg": rot["median_deg"],
           "rot_mean_deg": rot["mean_deg"], "mirrored": rot["mirrored"]}
    if poses.shifts is not None:
        out["shift_median_px"] = metrics.translation_errors(poses.shifts, np.asarray(truth_ps.shifts)[idx])["median_px"]
    else:
        out["shift_median_px"] = None
    rotations = torch.as_tensor(np.asarray(poses.rotations), dtype=torch.float32)
    shifts = (torch.zeros(len(idx), 2) if poses.shifts is None
              else torch.as_tensor(np.asarray(poses.shifts), dtype=torch.float32))
    half = np.asarray(truth_ps.half_set).astype(np.int64)[idx]
    apix = float(np.asarray(truth_ps.apix)[0])

    def chunks():
        for pos in range(0, len(idx), 256):
            sel = idx[pos:pos + 256]
            yield ParticleChunk(images=torch.from_numpy(truth_ps.read_images(sel)),
                                rotations=rotations[pos:pos + 256], half_sets=half[pos:pos + 256],
                                shifts=shifts[pos:pos + 256], ctf=truth_ps.ctf_params(sel), apix=apix)

    try:
        full, h1, h2 = reconstruct_half_maps(chunks(), box=truth_ps.box)
    finally:
        truth_ps.close()
    truth_map, _ = read_map(dataset_dir / "truth.mrc")
    out["res_truth_fsc05_A"] = metrics.map_resolution(full, truth_map, apix, 0.5, G=np.asarray(rot["G"]),
                                                     mirrored=rot["mirrored"])
    freq, curve = fsc(h1, h2)
    out["res_half_fsc0143_A"] = float(resolution_at(freq, curve, apix, 0.143))
    out["apix"] = apix
    return out


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line (flushed and fsynced, so a crash later loses nothing already measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and math.isinf(x):
        return None
    return str(x)


def stages_record(run: MethodRun) -> list[dict]:
    return [asdict(s) for s in run.stages]
