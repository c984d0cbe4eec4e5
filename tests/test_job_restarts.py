"""A one-class refinement whose verdict is not ``ok`` is refined again from random poses and the better judged
kept; an ``ok`` one is kept as it is (cryofastar_core/job/poses.py, ``_restarted_if_not_ok``). Whether a
restart reaches ``ok`` is measured where the verdict is calibrated, at 2,000 particles of box 64
(bench/results/2026-12-06-classes.md, session 18): sets this small stay ``doubtful`` from random poses."""
from __future__ import annotations

import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from cryofastar_core.geometry import random_rotations
from cryofastar_core.io import read_particles
from cryofastar_core.job import poses as job_poses
from cryofastar_core.job.judge import judged_key
from cryofastar_core.job.work_scale import plan_work
from cryofastar_core.reconstruct import half_sets
from cryofastar_core.refine.driver import RefineConfig
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, tiny_map_file):
    out = tmp_path_factory.mktemp("restart")
    star = simulate(SimulateConfig(out_dir=out, n=400, box=32, snr=3.0, seed=5, map_path=tiny_map_file, ctf=True,
                                   max_shift=1.0))
    return read_particles(star, star.parent)


def _refined(ps, rotations, rcfg):
    idx, half = np.arange(len(ps)), half_sets(ps.half_set, len(ps))
    scale = plan_work(ps.box, float(ps.apix[0]), half, None, 100000, 0)
    first = job_poses._refine_from(ps, idx, scale, rotations, np.zeros((len(ps), 2)), half, float(ps.apix[0]), rcfg,
                                   CPU, None, None)
    return idx, half, scale, first


def test_a_doubtful_refinement_is_restarted_and_the_better_judged_kept(clean_set, caplog):
    ps = clean_set
    rcfg = RefineConfig(iterations=1)
    chance = random_rotations(len(ps), generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    # A first refinement that cannot have converged: one global pass from chance poses.
    idx, half, scale, first = _refined(ps, chance, replace(rcfg, global_passes=1))
    judged_first = job_poses._judged_without_junk(ps, idx, first[0], half, CPU)
    assert judged_first.verdict != "ok", judged_first
    with caplog.at_level(logging.INFO, logger="cryofastar_core.job.poses"):
        best = job_poses._restarted_if_not_ok(ps, idx, scale, np.zeros((len(ps), 2)), half, float(ps.apix[0]),
                                              rcfg, 0, first, CPU, None, None)
    assert caplog.text.count("refining again from random poses") == job_poses.RESTARTS
    judged = job_poses._judged_without_junk(ps, idx, best[0], half, CPU)
    # the kept result is the best judged of the first and every restart (as each restart's log line judged it)
    tried = [judged_key(judged_first)] + [
        ({"failed": 0, "doubtful": 1, "ok": 2}[verdict], float(sharpness))
        for verdict, sharpness in re.findall(r"restart \d: judged (\w+) \(sharpness ([-\d.na]+)\)", caplog.text)]
    assert len(tried) == 1 + job_poses.RESTARTS
    assert judged_key(judged)[0] == max(tried)[0] and judged_key(judged)[1] == pytest.approx(max(tried)[1], abs=0.006)


def test_an_ok_refinement_is_kept_without_a_restart(clean_set, caplog):
    ps = clean_set
    idx, half, scale, first = _refined(ps, ps.rotations, RefineConfig(iterations=1, global_step_deg=None))
    assert job_poses._judged_without_junk(ps, idx, first[0], half, CPU).verdict == "ok"
    with caplog.at_level(logging.INFO, logger="cryofastar_core.job.poses"):
        kept = job_poses._restarted_if_not_ok(ps, idx, scale, np.zeros((len(ps), 2)), half, float(ps.apix[0]),
                                              RefineConfig(iterations=1), 0, first, CPU, None, None)
    assert kept is first and "refining again" not in caplog.text
