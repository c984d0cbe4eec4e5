"""Refinement at the size the job needs (cryofastar_core/job/work_scale.py): the local box from a target
resolution, the balanced ab initio subset, images cropped as read, and the job's subset-then-everyone path
(half sets apart, every particle posed, maps at the input box); the streamed reconstruction is independent
of how the particles are chunked."""
from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from _ranks import on_two_ranks, one_thread
from cryofastar_core.evaluation.against_truth import evaluate
from cryofastar_core.io import read_particles
from cryofastar_core.job import JobConfig, run
from cryofastar_core.job.maps import reconstruct_maps
from cryofastar_core.job.work_scale import balanced_subset, cropped_loader, local_box_for, plan_work, scratch_for
from cryofastar_core.physics.fourier import fourier_crop
from cryofastar_core.reconstruct.centring import centring_offset
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

N, BOX = 600, 40


@pytest.mark.parametrize("box, apix, target, expected", [
    (128, 2.0, 8.0, 64),     # 8 Å is Nyquist at 4 Å/px
    (128, 2.0, 6.0, 86),     # the smallest even box reaching 6 Å: ceil(128 * 2 / 6) = 43 -> 86
    (128, 2.0, 3.0, 128),    # finer than the input allows: the input box
    (128, 2.0, None, 64),    # no target: a 64 box
    (48, 2.0, None, 48),     # ... or the input box when smaller
    (128, 1.0, 20.0, 32),    # never below 32
    (24, 1.0, 20.0, 24),     # nor above the input box
])
def test_local_box_reaches_the_target(box, apix, target, expected):
    assert local_box_for(box, apix, target) == expected


def test_subset_is_balanced_over_the_half_sets():
    half = np.array([1] * 700 + [2] * 300)
    sub = balanced_subset(half, 200, seed=3)
    assert len(sub) == 200 and len(set(sub.tolist())) == 200 and np.all(np.diff(sub) > 0)
    assert (half[sub] == 1).sum() == 100 and (half[sub] == 2).sum() == 100
    assert np.array_equal(sub, balanced_subset(half, 200, seed=3))  # every rank draws the same
    assert balanced_subset(half, 0, 3) is None and balanced_subset(half, 1000, 3) is None
    plan = plan_work(128, 2.0, half, 8.0, 200, 3)
    assert plan.ab_initio_box == 64 and plan.local_box == 64 and plan.local_search


@pytest.fixture(scope="module")
def particles40(tmp_path_factory, tiny_map_file) -> Path:
    out = tmp_path_factory.mktemp("scale")
    return simulate(SimulateConfig(out_dir=out, n=N, box=BOX, snr=1.0, seed=7, map_path=tiny_map_file, ctf=True,
                                   max_shift=1.5))


def test_images_are_cropped_as_read(particles40):
    ps = read_particles(particles40)
    idx = np.array([5, 1, 9])
    got = cropped_loader(ps, idx, 32, torch.device("cpu"))(np.array([0, 2]))
    signed = ps.read_images(idx[[0, 2]]) * ps.sign[idx[[0, 2]], None, None]
    want = fourier_crop(torch.as_tensor(signed, dtype=torch.float32), 32)
    assert got.shape == (2, 32, 32) and torch.equal(got, want)


def test_cropped_images_come_back_from_the_scratch_unchanged(particles40, tmp_path, monkeypatch):
    """Inside ``scratch_for`` each particle's cropped image is made once, and what later reads get is what a
    fresh crop (in another chunk) gives, bit for bit; the scratch is gone afterwards."""
    ps = read_particles(particles40)
    idx = np.arange(len(ps))
    fresh = cropped_loader(ps, idx, 32, torch.device("cpu"))(np.arange(0, 60))
    reads = []
    real = ps.read_signed_images
    monkeypatch.setattr(ps, "read_signed_images", lambda g: reads.append(len(g)) or real(g))
    with scratch_for(ps, tmp_path / "scratch"):
        load = cropped_loader(ps, idx, 32, torch.device("cpu"))
        made = load(np.arange(10, 40))
        kept = load(np.arange(0, 60))
        assert reads == [30, 30]                  # the second read made only the 30 not yet kept
    assert torch.equal(made, fresh[10:40]) and torch.equal(kept, fresh)
    assert ps.scratch is None and not (tmp_path / "scratch").exists()


def test_subset_then_every_particle(particles40, tiny_weights, tmp_path):
    """Ab initio on 300 particles at box 32, then every particle assigned and refined at box 32, the maps
    at the input box 40: every particle posed (chance is ~100 deg: an ab initio that failed on the subset
    leaves the others there too), half sets as given, the subset's history first."""
    out = tmp_path / "job"
    report = run(JobConfig(particles=particles40, out_dir=out, weights=str(tiny_weights), views=16, candidates=3,
                           anchors=4, device="cpu", refine_iters=2, target_resolution=9.0, ab_initio_particles=300))
    data = json.loads((out / "report.json").read_text())
    assert data["work_scale"] == {"input_box": BOX, "ab_initio_box": 32, "local_box": 32, "ab_initio_particles": 300,
                                  "feed_forward_particles": 300}
    # The network posed only the subset refinement started from (the same draw); the others carry no confidence.
    saved = np.load(out / ".cryofastar" / "poses.npz")
    ff = saved["feed_forward_posed"]
    assert int(ff.sum()) == 300 and np.isfinite(saved["confidence"][ff]).all() and np.isnan(saved["confidence"][~ff]).all()
    from cryofastar_core.job.work_scale import balanced_subset
    np.testing.assert_array_equal(np.flatnonzero(ff), balanced_subset(read_particles(particles40).half_set, 300, 0))
    stages = [(h.get("particles"), h["stage"]) for h in data["refinement"]]
    assert stages[0] == ("ab initio subset", "start") and ("ab initio subset", "global") in stages
    assert stages[-1] == (None, "local") and (None, "mates") in stages and sum(s == (None, "global") for s in stages) == 1
    assert mrcfile.read(out / "map.mrc").shape == (BOX, BOX, BOX)
    assert not (out / ".cryofastar" / "scratch").exists()  # the cropped images' scratch is removed
    assert set(data["peak_memory_mb"]) >= {"read", "poses", "refine", "reconstruct", "write"}
    given, posed = read_particles(particles40), read_particles(out / "particles.star", particles40.parent)
    assert report.n_kept + data["junk"]["n_flagged"] == N
    np.testing.assert_array_equal(posed.half_set, given.half_set)
    ev = evaluate(out / "particles.star", particles40, project_dir=particles40.parent)
    print("rotation error", ev["rotation"]["median_deg"], "deg, shift", ev["translation"]["median_px"], "px")
    assert ev["rotation"]["median_deg"] < 25.0 and ev["translation"]["median_px"] < 1.0
    # The frame's origin is measured again at the input box: the map written is centred there, and it is
    # the reconstruction of the shifts written (both moved together).
    written = torch.as_tensor(mrcfile.read(out / "map.mrc").astype(np.float32))
    assert float(centring_offset(written).norm()) < 0.05
    assert len(posed) == report.n_kept  # every particle written went into the maps
    kept = np.ones(len(posed), dtype=bool)
    again = reconstruct_maps(posed, posed.rotations, posed.shifts, posed.half_set, kept, float(posed.apix[0]),
                             torch.device("cpu"))[0]
    assert float(torch.corrcoef(torch.stack([again.flatten(), written.flatten()]))[0, 1]) > 0.999


def test_streamed_reconstruction_does_not_depend_on_chunks(particles40):
    ps = read_particles(particles40)
    keep = np.ones(len(ps), dtype=bool)
    keep[::7] = False
    args = (ps, ps.rotations, ps.shifts, ps.half_set, keep, float(ps.apix[0]), torch.device("cpu"))
    one = reconstruct_maps(*args, read_chunk=len(ps))
    streamed = reconstruct_maps(*args, read_chunk=13)
    for a, b in zip(one, streamed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_local_matching_stops_where_a_step_moves_a_sample_by_the_set_motion():
    from cryofastar_core.refine.config import RefineConfig, step_limited_shells

    cfg = RefineConfig(step_motion_px=1.0)
    assert step_limited_shells(31.0, 7.5, cfg) == pytest.approx(1 / np.radians(7.5))    # 7.6 shells
    assert step_limited_shells(25.0, 1.875, cfg) == 25.0                                # a fine step: the band
    assert step_limited_shells(31.0, 45.0, cfg) == cfg.min_shells                        # never below min_shells
    assert step_limited_shells(3.0, 45.0, cfg) == 3.0                                    # nor above the band
    assert step_limited_shells(31.0, 7.5, RefineConfig()) == 31.0                       # off by default


def _refine_kept(comm, star: str, start: dict) -> dict:
    from cryofastar_core.job.poses import refine_kept

    ps = read_particles(star)
    cfg = JobConfig(particles=Path(star), out_dir=Path(star).parent / "unused", refine_iters=1, target_resolution=9.0,
                    ab_initio_particles=300)
    keep = np.ones(len(ps), dtype=bool)
    r = refine_kept(cfg, ps, start["R"], start["s"], start["half"], keep, float(ps.apix[0]), torch.device("cpu"),
                    None, comm)
    return dict(R=r.rotations, s=r.shifts, stages=[(h.get("particles"), h["stage"]) for h in r.history])


def test_subset_path_shared_over_two_ranks(particles40):
    """The subset's ab initio and the every-particle passes under two ranks: both ranks come out with the same
    poses, and with one process's up to the order of the sums."""
    from cryofastar_core.geometry import rotation_angle_deg

    ps = read_particles(particles40)
    start = dict(R=ps.rotations, s=ps.shifts, half=ps.half_set.astype(np.int64))  # start at the truth: signal
    one = one_thread(_refine_kept, None, str(particles40), start)
    r0, r1 = on_two_ranks(_refine_kept, str(particles40), start)
    assert np.array_equal(r0["R"], r1["R"]) and np.array_equal(r0["s"], r1["s"]) and r0["stages"] == one["stages"]
    ang = rotation_angle_deg(torch.as_tensor(one["R"]), torch.as_tensor(r0["R"]))
    print(f"2 ranks vs 1 process: rotation diff median {float(ang.median()):.2e} max {float(ang.max()):.2e} deg")
    assert float(ang.median()) < 0.05


def test_verdict_judges_a_large_box_at_the_calibrated_box(tmp_path, tiny_map_file):
    """Particles at box 96 are judged at box 64 (cropped images and half maps): their true poses pass and
    random poses fail, as at the box the thresholds were calibrated at."""
    from cryofastar_core.geometry import random_rotations
    from cryofastar_core.job.judge import assess_quality

    star = simulate(SimulateConfig(out_dir=tmp_path / "sim96", n=400, box=96, snr=1.0, seed=11,
                                   map_path=tiny_map_file, ctf=True, max_shift=2.0))
    ps = read_particles(star)
    keep = np.ones(len(ps), dtype=bool)
    apix, cpu = float(ps.apix[0]), torch.device("cpu")
    for rotations, expected in ((ps.rotations, "ok"),
                                (random_rotations(len(ps), torch.Generator().manual_seed(2)).double().numpy(), "failed")):
        _, h1, h2 = reconstruct_maps(ps, rotations, ps.shifts, ps.half_set, keep, apix, cpu)
        quality = assess_quality(ps, np.arange(len(ps)), rotations, ps.shifts, ps.half_set, (h1, h2), cpu)
        assert quality.verdict == expected, quality.reasons
