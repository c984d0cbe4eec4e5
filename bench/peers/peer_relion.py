"""RELION 3.1 initial model, as a RELION user runs it, in three timed stages:

1. ``relion_preprocess --operate_on STACK --norm --bg_radius R``: background mean 0 / stddev 1, the
   input RELION expects (3.1 no longer normalises a STAR file in place, so each stack is done and a
   STAR pointing at the normalised stacks is written next to them);
2. ``relion_refine --denovo_3dref --sgd`` with a shortened schedule (see :class:`RelionSchedule`);
3. one expectation step against the SGD map (``--iter 1 --K 1``, a 3D classification pass) so that
   every particle gets a pose: SGD only updates the particles of its mini-batches.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.peers.common import MethodRun, Poses, run_stages, thread_env

NAME = "relion"


@dataclass
class RelionSchedule:
    """SGD schedule and sampling (RELION 3.1.3 flag names)."""

    ini_iter: int = 10
    inbetween_iter: int = 20
    fin_iter: int = 10
    ini_subset: int = 100
    fin_subset: int = 200
    ini_resol: float = 35.0
    fin_resol: float = 15.0
    healpix_order: int = 1  # SGD sampling (15°)
    assign_healpix_order: int = 2  # the final pose pass (7.5°)

    @property
    def total_iter(self) -> int:
        return self.ini_iter + self.inbetween_iter + self.fin_iter

    def describe(self) -> str:
        return (f"SGD {self.ini_iter}/{self.inbetween_iter}/{self.fin_iter} it, subsets {self.ini_subset}->"
                f"{self.fin_subset}, {self.ini_resol:g}->{self.fin_resol:g} Å, hp{self.healpix_order}; "
                f"+1 E-step hp{self.assign_healpix_order}")


QUICK = RelionSchedule(ini_iter=3, inbetween_iter=4, fin_iter=3, ini_subset=50, fin_subset=100,
                       assign_healpix_order=1)


def check() -> str | None:
    return None if shutil.which("relion_refine") else "relion_refine not on PATH"


def _diameter_angst(dataset_dir: Path) -> tuple[float, int]:
    from cryofastar_core.io import read_map

    vol, apix = read_map(dataset_dir / "truth.mrc")
    box = vol.shape[-1]
    return 0.9 * box * apix, box  # eval maps fill 0.8 of the box; leave a margin


NORM_PREFIX = "norm_"


def _normalise_commands(dataset_dir: Path, work_dir: Path, box: int) -> dict[str, list]:
    """``{stack name: relion_preprocess command}`` writing ``WORK/norm_<stack>`` for every stack of the dataset."""
    import starfile

    names = starfile.read(dataset_dir / "particles.star", always_dict=True)["particles"]["rlnImageName"]
    stacks = sorted({n.split("@", 1)[1] for n in names})
    bg = max(2, int(0.45 * box))
    return {st: ["relion_preprocess", "--operate_on", st, "--operate_out",
                 (work_dir / f"{NORM_PREFIX}{Path(st).name}").resolve(), "--norm", "--bg_radius", bg] for st in stacks}


def _write_normalised_star(src: Path, dst: Path, stacks: dict) -> None:
    import starfile

    blocks = starfile.read(src, always_dict=True)
    parts = blocks["particles"].copy()
    parts["rlnImageName"] = [f"{i}@{NORM_PREFIX}{Path(st).name}" for i, st in
                             (n.split("@", 1) for n in parts["rlnImageName"])]
    starfile.write({"optics": blocks["optics"], "particles": parts}, dst, overwrite=True)


def match_normalised(pred, truth):
    """``(i_pred, i_truth)``: particles of RELION's output (images ``norm_<stack>``) matched to the dataset's."""
    import numpy as np

    key = lambda ps, i, strip: (Path(ps.image_files[int(ps.file_index[i])]).name.removeprefix(strip),
                                int(ps.slice_index[i]))
    where = {key(truth, j, ""): j for j in range(len(truth))}
    pairs = [(i, where[k]) for i in range(len(pred)) if (k := key(pred, i, NORM_PREFIX)) in where]
    return np.array([p for p, _ in pairs], dtype=np.int64), np.array([t for _, t in pairs], dtype=np.int64)


def run(dataset_dir: Path, work_dir: Path, threads: int, timeout: float, *, schedule: RelionSchedule,
        max_shift: float = 2.0) -> MethodRun:
    from cryofastar_core.io import read_particles

    s = schedule
    diameter, box = _diameter_angst(dataset_dir)
    offset_range = int(math.ceil(max_shift)) + 2
    (work_dir / "sgd").mkdir(parents=True, exist_ok=True)
    (work_dir / "assign").mkdir(parents=True, exist_ok=True)
    common = ["--ctf", "--K", 1, "--sym", "C1", "--zero_mask", "--particle_diameter", f"{diameter:.1f}",
              "--j", threads, "--pool", 3, "--dont_combine_weights_via_disc", "--oversampling", 1,
              "--offset_range", offset_range]
    sgd = ["relion_refine", "--i", "particles.star", "--o", (work_dir / "sgd" / "run").resolve(), "--denovo_3dref",
           "--sgd", "--sgd_ini_iter", s.ini_iter, "--sgd_inbetween_iter", s.inbetween_iter, "--sgd_fin_iter",
           s.fin_iter, "--sgd_ini_subset", s.ini_subset, "--sgd_fin_subset", s.fin_subset, "--sgd_ini_resol",
           s.ini_resol, "--sgd_fin_resol", s.fin_resol, "--sgd_write_iter", s.total_iter, "--healpix_order",
           s.healpix_order, "--offset_step", 2, "--pad", 1, "--skip_gridding", *common]
    run = MethodRun(settings={"schedule": s.describe(), "particle_diameter_A": round(diameter, 1)})
    env = thread_env(1)  # RELION's own --j threads; keep library pools at one thread each
    stacks = _normalise_commands(dataset_dir, work_dir, box)
    if not run_stages(run, [(cmd, dataset_dir) for cmd in stacks.values()], timeout, env, work_dir / "log.txt"):
        return run
    _write_normalised_star(dataset_dir / "particles.star", work_dir / "particles.star", stacks)
    if not run_stages(run, [(sgd, work_dir)], timeout, env, work_dir / "log.txt"):
        return run
    maps = sorted((work_dir / "sgd").glob("run_it*_class001.mrc"))
    if not maps:
        run.status, run.reason = "failed", "relion_refine --sgd wrote no class001 map"
        return run
    assign = ["relion_refine", "--i", "particles.star", "--o", (work_dir / "assign" / "run").resolve(), "--ref",
              maps[-1].resolve(), "--ini_high", s.fin_resol, "--iter", 1, "--tau2_fudge", 4, "--healpix_order",
              s.assign_healpix_order, "--offset_step", 1, *common]
    if not run_stages(run, [(assign, work_dir)], timeout, env, work_dir / "log.txt"):
        return run
    pred = read_particles(work_dir / "assign" / "run_it001_data.star", work_dir)
    truth = read_particles(dataset_dir / "particles.star", dataset_dir)
    ip, it = match_normalised(pred, truth)
    run.poses = Poses(indices=it, rotations=pred.rotations[ip], shifts=None if pred.shifts is None else pred.shifts[ip])
    return run
