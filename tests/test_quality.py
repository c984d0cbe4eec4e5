"""The pose-quality verdict on pose sets whose quality is known (cryofastar_core/evaluation/verdict.py)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from cryofastar_core.geometry import random_rotations, rotations_at_angle
from cryofastar_core.job import Report
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.evaluation.verdict import QualityConfig, assess_poses, viewing_coverage
from cryofastar_core.reconstruct import random_half_sets, reconstruct_half_maps
from cryofastar_core.simulation.images import simulate_images

N = 600


@pytest.fixture(scope="module")
def particles(tiny_map):
    """``N`` noisy views (SNR 1, no CTF, no shifts) of the tiny map at Haar-random poses."""
    vol, _ = tiny_map
    gen = torch.Generator().manual_seed(3)
    R = random_rotations(N, generator=gen)
    _, images = simulate_images(prepare_volume(torch.from_numpy(np.array(vol))), R, snr=1.0, generator=gen)
    half = random_half_sets(N, torch.Generator().manual_seed(4))
    return images, R.double(), half


def _judge(particles, R):
    images, _, half = particles
    R = torch.as_tensor(R, dtype=torch.float64)
    shifts = torch.zeros(N, 2, dtype=torch.float64)
    _, h1, h2 = reconstruct_half_maps(images, R.float(), half_sets=torch.as_tensor(half))
    return assess_poses(lambda idx: images[torch.as_tensor(idx)], None, 3.0, R, shifts, half, (h1, h2),
                        QualityConfig(random_poses=8, near_poses=8))


def _turned(R: torch.Tensor, deg: float, seed: int) -> torch.Tensor:
    return R @ rotations_at_angle(R.shape[0], deg, torch.Generator().manual_seed(seed))


def test_true_poses_are_ok(particles):
    q = _judge(particles, particles[1])
    assert q.verdict == "ok", q
    assert q.significance > 0.8 and q.sharpness > 0.8 and q.coverage > 0.9
    # Haar-random views: the orientation diagnostic is near its ideal and adds no reason.
    assert q.to_dict()["orientation"]["scf"] > 0.95 and not q.orientation["anisotropic"]
    assert not any("orientation sampling" in r for r in q.reasons)


def test_preferred_orientation_is_said_without_failing_the_poses(tiny_map):
    """70 % of the views within 25 degrees of one axis, exact poses: not failed (the uneven coverage makes it
    doubtful at most), and the reasons say how anisotropic the sampling is (issue 24: nothing did)."""
    from cryofastar_core.geometry import rotations_within_tilt

    vol, _ = tiny_map
    gen = torch.Generator().manual_seed(11)
    k = int(0.7 * N)
    R = torch.cat([rotations_within_tilt(k, 25.0, generator=gen), random_rotations(N - k, generator=gen)])
    _, images = simulate_images(prepare_volume(torch.from_numpy(np.array(vol))), R, snr=1.0, generator=gen)
    half = random_half_sets(N, torch.Generator().manual_seed(4))
    q = _judge((images, R.double(), half), R.double())
    assert q.verdict != "failed" and q.significance > 0.8 and q.sharpness > 0.8, q
    assert q.orientation["anisotropic"] and q.orientation["scf"] < 0.8
    assert any(r.startswith("orientation sampling (SCF") for r in q.reasons)


def test_random_poses_fail_as_chance(particles):
    q = _judge(particles, random_rotations(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    assert q.verdict == "failed", q
    assert abs(q.significance) < 0.1 and "random poses" in q.reasons[0]


def test_collapsed_poses_fail_on_coverage(particles):
    one = particles[1][:1].expand(N, 3, 3)
    q = _judge(particles, _turned(one, 3.0, seed=5))
    assert q.verdict == "failed", q
    assert q.coverage < 0.2 and any("viewing directions" in r for r in q.reasons)


def test_roughly_right_poses_are_not_ok(particles):
    """Poses 40 degrees off still give a map with the right low-resolution shape (significance above
    chance) but must not pass as ready for local refinement."""
    q = _judge(particles, _turned(particles[1], 40.0, seed=6))
    assert q.verdict != "ok", q
    assert q.sharpness < _judge(particles, particles[1]).sharpness - 0.3


def test_coverage_of_uniform_and_single_directions():
    gen = torch.Generator().manual_seed(0)
    assert viewing_coverage(random_rotations(5000, generator=gen, dtype=torch.float64)) > 0.97
    assert viewing_coverage(torch.eye(3, dtype=torch.float64).expand(100, 3, 3)) == 0.0


def _report(verdict: str | None) -> Report:
    quality = {} if verdict is None else {"verdict": verdict, "reasons": [f"because {verdict}"]}
    return Report(version="x", settings={}, weights={}, n_particles=10, n_kept=10, reference=0, flipped_chunks=0,
                  n_chunks=1, apix=1.0, box=32, model_box=32,
                  resolution_0143=None if verdict == "failed" else 7.5, quality=quality)


def test_a_failed_verdict_presents_no_resolution():
    assert "7.50 Å" in _report("ok").resolution_text
    assert "doubtful" in _report("doubtful").resolution_text
    text = _report("failed").resolution_text
    assert "Å" not in text and "no resolution" in text
    assert _report("failed").verdict_lines == ["POSE QUALITY: FAILED: because failed"]


def test_disagreeing_class_averages_make_an_unrefined_ok_doubtful():
    from cryofastar_core.evaluation.verdict import PoseQuality, with_class_disagreement

    ok = PoseQuality(verdict="ok", reasons=["fine"], significance=1.0, sharpness=1.0, coverage=1.0,
                     half_map_fsc_0143_A=5.0, n_particles_scored=100)
    assert with_class_disagreement(ok, 0.5, 0.2, refined=False) == ok  # agreeing averages: untouched
    low = with_class_disagreement(ok, 0.12, 0.2, refined=False)
    assert low.verdict == "doubtful" and "mix views" in low.reasons[0]
    refined = with_class_disagreement(ok, 0.12, 0.2, refined=True)
    assert refined.verdict == "ok" and "mix views" in refined.reasons[-1]


def test_mate_passes_that_did_not_settle_make_an_ok_run_doubtful():
    """The last mate pass still turning more than MATES_UNRESOLVED_ABOVE of the particles it tested leaves a
    blend of the pose and its mate (6FLR at 2,000: 5.8 %); a settled one (3HSY, 6FLR at 10,000: 0-0.6 %) or a
    run without mate passes leaves the verdict alone."""
    from cryofastar_core.evaluation.verdict import MATES_UNRESOLVED_ABOVE, PoseQuality, with_unresolved_mates

    ok = PoseQuality(verdict="ok", reasons=["fine"], significance=1.0, sharpness=1.0, coverage=1.0,
                     half_map_fsc_0143_A=5.0, n_particles_scored=100)

    def passes(*fractions: float) -> list[dict]:
        return [{"stage": "local"}] + [{"stage": "mates", "mode": "choose", "mate_score": 0.6, "flipped_fraction": f}
                                       for f in fractions] + [{"stage": "local"}]

    assert with_unresolved_mates(ok, [{"stage": "local"}]) == ok
    assert with_unresolved_mates(ok, passes(0.3, 0.1, 0.006, 0.0)) == ok
    blend = with_unresolved_mates(ok, passes(0.15, 0.1, 0.06, 0.058))
    assert blend.verdict == "doubtful" and "half turn" in blend.reasons[0] and "5.8%" in blend.reasons[0]
    assert with_unresolved_mates(ok, passes(MATES_UNRESOLVED_ABOVE)).verdict == "ok"
    failed = PoseQuality(**{**ok.__dict__, "verdict": "failed", "reasons": ["bad"]})
    assert with_unresolved_mates(failed, passes(0.2)).reasons[0] == "bad"
