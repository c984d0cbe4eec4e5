"""The split test of cryofastar_core/evaluation/heterogeneity.py: two classes of one structure (however noisy,
however blurred one of them) reproduce across the half sets as one; two structures do not."""
from __future__ import annotations

import math

import torch

from _volumes import blob_volume
from cryofastar_core.evaluation.heterogeneity import HETEROGENEOUS_ABOVE, split_reproducibility
from cryofastar_core.evaluation.verdict import PoseQuality, with_heterogeneity
from cryofastar_core.physics.fourier import lowpass_volume
from cryofastar_core.reconstruct import soft_sphere_mask

BOX = 40


def _noisy(signal: torch.Tensor, sd: float, seed: int) -> torch.Tensor:
    return signal + sd * torch.randn(signal.shape, generator=torch.Generator().manual_seed(seed))


def _halves(signal: torch.Tensor, sd: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _noisy(signal, sd, seed), _noisy(signal, sd, seed + 1)


def test_one_structure_splits_into_classes_that_reproduce_as_one():
    """Class B: fewer particles (noisier) and worse poses (the signal blurred): still one structure."""
    mask = soft_sphere_mask(BOX, 0.45 * BOX - 3, 3)
    s = blob_volume(BOX, seed=0)
    a = _halves(s, 0.05, seed=10)
    b = _halves(lowpass_volume(s, 0.12), 0.1, seed=20)
    test = split_reproducibility(a, b, mask, [600, 400])
    assert test.shells >= 3 and not test.heterogeneous, test
    assert test.figure < HETEROGENEOUS_ABOVE / 2


def test_two_structures_do_not_reproduce_as_one():
    mask = soft_sphere_mask(BOX, 0.45 * BOX - 3, 3)
    s = blob_volume(BOX, n_blobs=12, seed=0)
    other = blob_volume(BOX, n_blobs=8, seed=0)  # the same first eight blobs: a third of the mass gone
    test = split_reproducibility(_halves(s, 0.05, 10), _halves(other, 0.05, 20), mask, [500, 500])
    assert test.heterogeneous and test.figure > 3 * HETEROGENEOUS_ABOVE, test


def test_too_few_measured_shells_give_no_judgement():
    mask = soft_sphere_mask(BOX, 0.45 * BOX - 3, 3)
    s = blob_volume(BOX, seed=0)
    test = split_reproducibility(_halves(s, 50.0, 1), _halves(s, 50.0, 3), mask, [10, 10])
    assert math.isnan(test.figure) and not test.heterogeneous and test.to_dict()["figure"] is None


def test_the_verdict_says_a_mixture_plainly():
    ok = PoseQuality(verdict="ok", reasons=["fine"], significance=1.0, sharpness=0.9, coverage=0.9,
                     half_map_fsc_0143_A=4.0, n_particles_scored=100)
    mask = soft_sphere_mask(BOX, 0.45 * BOX - 3, 3)
    mixed = split_reproducibility(_halves(blob_volume(BOX, seed=0), 0.05, 10),
                                  _halves(blob_volume(BOX, seed=5), 0.05, 20), mask, [500, 500])
    judged = with_heterogeneity(ok, mixed)
    assert judged.verdict == "doubtful" and "--classes 2" in judged.reasons[0]
    assert judged.heterogeneity["heterogeneous"] and judged.to_dict()["heterogeneity"]["sizes"] == [500, 500]
    failed = with_heterogeneity(PoseQuality(**{**ok.__dict__, "verdict": "failed", "reasons": ["chance"]}), mixed)
    assert failed.verdict == "failed" and failed.reasons[0] == "chance"
