"""Known-answer tests of :func:`cryofastar_core.inference.estimator.estimate_poses` (issue 15).

The model is replaced by :class:`TruthModel`, which keeps the real model's output contract
(:class:`~cryofastar_core.model.output.ModelOutput`: normalised polar FPMs ``(B, V, L, K, 3)`` on the line
model's ``polar_grid``, confidences ``>= 1``) and returns the exact answer, computed from known rotations
and shifts with the project's own :func:`~cryofastar_core.model.fpm.fpm_targets`. Each image carries
its particle's index in a corner pixel, so the model knows which particles a pass holds, and a round
blob moved by the particle's shift, which the estimator's centroid shifts read back.

On top of the exact FPM the model can, per view or per pass, set the Kabsch residual to a chosen value
(a radial pattern orthogonal to every rigid motion, so the fitted pose stays exact), set the
confidence, predict a pass in the mirrored hand (:func:`~cryofastar_core.model.fpm.mirror_fpm`) or in
a frame turned about the reference's viewing axis. So every quantity the estimator returns has a
known value: poses (in the reference's frame), shifts, residuals, confidences, the chosen reference,
the anchors, the flipped chunks and each chunk's drift.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch

from cryofastar_core.geometry import mirror_rotations, random_rotations
from cryofastar_core.inference.estimator import (EstimatorConfig, ViewPrediction, _align_hand, estimate_poses,
                                                 predict_views)
from cryofastar_core.model.fpm import denormalize, fpm_targets, mirror_fpm, normalize
from cryofastar_core.model.lines import polar_grid
from cryofastar_core.model.output import ModelOutput

N = 40  # particles
BOX = 32  # model box (pixels); shifts are returned in these pixels
ID_SCALE = 1e-3  # pixel (0, 0) holds the particle's index times this: far outside the mask, it moves no centroid
N_LINES, N_RADII = 6, 4  # polar grid: radii 1/4, 1/2, 3/4, 1
# A radial pattern with sum_k s_k = 0 and sum_k s_k r_k = 0: adding eps * s_k * d to every line moves no
# centroid and no cross-moment, so Kabsch's pose is unchanged and its residual is exactly eps.
RESIDUAL_PATTERN = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
RESIDUAL_DIRECTION = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3.0
CFG = dict(views=8, candidates=4, anchors=2, chunks_per_batch=2, seed=0)
# With these numbers: 4 candidates, 7 auxiliary views in the first pass, 32 further particles in chunks of
# 8 - 1 - 2 = 5 new particles: 7 chunks (six of 5, one of 2) in 4 forward batches.
N_CHUNKS = 7
# The estimator runs Kabsch in float32: poses agree with the answer to ~1e-6, and a drift of 0 reads as up
# to ~0.06 degrees (arccos near 1). A wrong pose or hand is off by far more.
TOL_ROT = 1e-4
TOL_DRIFT_DEG = 0.5


class TruthModel(torch.nn.Module):
    """A stand-in for the pose model that answers exactly from the known poses (see the module docstring)."""

    def __init__(self, rotations: torch.Tensor, shifts: torch.Tensor):
        super().__init__()
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # estimate_poses reads the device from it
        self.rotations, self.shifts = rotations, shifts
        self.grid = polar_grid(N_LINES, N_RADII, dtype=torch.float64)
        self.conf = torch.full((len(rotations),), 2.0, dtype=torch.float64)  # per particle, >= 1
        self.resid = torch.full((len(rotations),), 0.01, dtype=torch.float64)  # per particle (grid units)
        self.pass_conf: dict[int, float] = {}  # reference id -> factor on every view's confidence in its passes
        self.pass_resid: dict[int, float] = {}  # reference id -> factor on every view's residual in its passes
        self.mirror: Callable[[list[int]], bool] = lambda ids: False  # pass predicted in the other hand
        self.turn: Callable[[list[int]], torch.Tensor | None] = lambda ids: None  # frame error of a pass
        self.calls: list[torch.Tensor] = []  # particle ids (B, V) of every forward pass

    def forward(self, images: torch.Tensor) -> ModelOutput:
        ids = (images[..., 0, 0] / ID_SCALE).round().long()  # (B, V)
        self.calls.append(ids.clone())
        rot = self.rotations[ids]
        xyz = fpm_targets(rot[:, 0], rot, self.shifts[ids], BOX, self.grid)  # (B, V, L, K, 3), exact
        conf = self.conf[ids].clone()
        resid = self.resid[ids].clone()
        for b, row in enumerate(ids.tolist()):
            turn = self.turn(row)
            if turn is not None:  # auxiliary views in a frame turned about the reference's axis
                x = denormalize(xyz[b, 1:])
                xyz[b, 1:] = normalize(x @ turn.T)
            if self.mirror(row):
                xyz[b] = mirror_fpm(xyz[b])
            conf[b] *= self.pass_conf.get(row[0], 1.0)
            resid[b] *= self.pass_resid.get(row[0], 1.0)
        x = denormalize(xyz) + (resid[:, :, None, None, None] * RESIDUAL_PATTERN[:, None]
                                * RESIDUAL_DIRECTION)  # (B, V, 1, K, 3) broadcast over lines
        conf = conf[:, :, None, None].expand(*ids.shape, N_LINES, N_RADII)
        return ModelOutput(xyz=normalize(x).float(), conf=conf.float(), denoised=None, grid=self.grid.float())


def make_load(shifts: torch.Tensor) -> Callable[[np.ndarray], torch.Tensor]:
    """``load(idx)``: preprocessed images ``(n, BOX, BOX)``, a Gaussian blob at ``-shift`` (the origin
    convention: ``image(p) = centred(p + s)``) and the particle's index in pixel (0, 0)."""
    c = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    py, px = torch.meshgrid(c, c, indexing="ij")

    def load(idx: np.ndarray) -> torch.Tensor:
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        s = shifts[i].float()
        img = torch.exp(-((px + s[:, 0, None, None]) ** 2 + (py + s[:, 1, None, None]) ** 2) / 8.0)
        img[:, 0, 0] = i.float() * ID_SCALE
        return img

    return load


@pytest.fixture
def truth():
    g = torch.Generator().manual_seed(7)
    rotations = random_rotations(N, generator=g, dtype=torch.float64)
    shifts = (torch.rand(N, 2, generator=g, dtype=torch.float64) - 0.5) * 4.0  # +-2 px
    return rotations, shifts


def relative(rotations: torch.Tensor, ref: int) -> np.ndarray:
    """The answer: every pose in the reference particle's frame, ``Q_i = R_refᵀ R_i``."""
    return (rotations[ref].T @ rotations).numpy()


def run(model: TruthModel, **overrides):
    return estimate_poses(model, make_load(model.shifts), N, EstimatorConfig(**{**CFG, **overrides}))


def passes(model: TruthModel) -> tuple[list[int], list[int], list[list[int]]]:
    """``(candidates, auxiliary set, chunk passes in chunk order)`` from the forward passes a run made."""
    rows = [row for call in model.calls for row in call.tolist()]
    aux = rows[0][1:]
    scoring = [r for r in rows if r[1:] == aux]
    return [r[0] for r in scoring], aux, [r for r in rows if r[1:] != aux]


# --- hand check on its own ------------------------------------------------------------------------------------------

def test_align_hand_flips_a_mirrored_chunk_and_measures_drift(truth):
    rotations, _ = truth
    anchors = rotations[1:4]
    chunk = torch.cat([torch.eye(3, dtype=torch.float64)[None], anchors, rotations[4:9]])  # ref, 3 anchors, 5 new
    pred = ViewPrediction(chunk, torch.zeros(9, 2), torch.ones(9), torch.zeros(9))

    same, flipped, drift = _align_hand(pred, anchors, 3)
    assert not flipped and drift < 1e-4
    torch.testing.assert_close(same.rotation, chunk)

    mirrored = ViewPrediction(mirror_rotations(chunk), pred.shift, pred.confidence, pred.residual)
    back, flipped, drift = _align_hand(mirrored, anchors, 3)
    assert flipped and drift < 1e-4
    torch.testing.assert_close(back.rotation, chunk)

    turned = torch.cat([chunk[:1], _rz(20.0) @ chunk[1:]])
    _, flipped, drift = _align_hand(ViewPrediction(turned, pred.shift, pred.confidence, pred.residual), anchors, 3)
    assert not flipped and drift == pytest.approx(20.0, abs=1e-4)


# --- estimate_poses ---------------------------------------------------------------------------------------------------

def test_recovers_the_known_poses_in_the_reference_frame(truth):
    rotations, shifts = truth
    model = TruthModel(rotations, shifts)
    model.conf = 1.5 + torch.arange(N, dtype=torch.float64) / N
    model.resid = 0.005 + 0.0005 * torch.arange(N, dtype=torch.float64)
    est = run(model)

    candidates, aux, chunks = passes(model)
    assert est.reference in candidates and len(chunks) == est.n_chunks == N_CHUNKS
    np.testing.assert_array_equal(est.rotations[est.reference], np.eye(3))
    np.testing.assert_allclose(est.rotations, relative(rotations, est.reference), atol=TOL_ROT)
    # Centroids of a sampled blob inside the estimator's mask: a few thousandths of a pixel off (max 2.6e-3).
    np.testing.assert_allclose(est.shifts, shifts.numpy(), atol=5e-3, rtol=0)
    np.testing.assert_allclose(est.residual, model.resid.numpy(), rtol=1e-3)
    np.testing.assert_allclose(est.confidence, 1.0 - 1.0 / model.conf.numpy(), atol=1e-6)
    assert est.flipped_chunks == 0
    assert len(est.chunk_drift_deg) == N_CHUNKS and max(est.chunk_drift_deg) < TOL_DRIFT_DEG


def test_every_chunk_is_tied_to_the_reference_and_the_most_reliable_anchors(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    _, aux, _ = passes(probe)
    reliable = [aux[5], aux[2]]  # made clearly the most reliable views of the first pass

    model = TruthModel(rotations, shifts)
    model.conf[reliable] = 16.0
    model.resid[reliable] = 0.001
    est = run(model)

    assert sorted(est.anchors.tolist()) == sorted(reliable)
    _, _, chunks = passes(model)
    fixed = [est.reference, *est.anchors.tolist()]
    assert all(row[: 1 + CFG["anchors"]] == fixed for row in chunks)
    new = [row[1 + CFG["anchors"]:] for row in chunks]
    assert [len(n) for n in new] == [5] * 6 + [2]
    every = [est.reference, *aux, *[i for n in new for i in n]]
    assert sorted(every) == list(range(N))  # each particle in exactly one pass besides the fixed ones
    np.testing.assert_allclose(est.rotations, relative(rotations, est.reference), atol=TOL_ROT)


def test_a_chunk_predicted_in_the_mirrored_hand_is_flipped_back(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    _, aux, chunks = passes(probe)
    mirrored = set(chunks[3][1 + CFG["anchors"]:])  # the new particles of chunk 3 (some may be candidates:
    # their scoring passes stay as they were, so the same reference is chosen as in the probe)

    model = TruthModel(rotations, shifts)
    model.mirror = lambda ids: ids[1:] != aux and bool(mirrored & set(ids))
    # The stand-in really predicts that chunk in the other hand: Kabsch gives F Q F for all its views.
    raw = predict_views(model, make_load(shifts)(np.array(chunks[3]))[None])
    ref = chunks[3][0]
    np.testing.assert_allclose(raw.rotation[0, 1:].double().numpy(),
                               mirror_rotations(torch.as_tensor(relative(rotations, ref)[chunks[3][1:]])).numpy(),
                               atol=TOL_ROT)

    model.calls.clear()
    est = run(model)
    assert est.reference == ref and est.flipped_chunks == 1
    assert max(est.chunk_drift_deg) < TOL_DRIFT_DEG
    np.testing.assert_allclose(est.rotations, relative(rotations, est.reference), atol=TOL_ROT)


def test_a_mirrored_first_pass_sets_the_hand_of_every_chunk(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    _, aux, _ = passes(probe)

    model = TruthModel(rotations, shifts)
    model.mirror = lambda ids: ids[1:] == aux  # every reference candidate's pass, the first pass included
    est = run(model)
    assert est.flipped_chunks == est.n_chunks == N_CHUNKS
    answer = mirror_rotations(torch.as_tensor(relative(rotations, est.reference))).numpy()
    np.testing.assert_allclose(est.rotations, answer, atol=TOL_ROT)  # one hand for all: the first pass's


def test_a_chunk_in_a_disagreeing_frame_shows_as_drift(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    _, aux, chunks = passes(probe)
    turned = set(chunks[5][1 + CFG["anchors"]:])

    model = TruthModel(rotations, shifts)
    model.turn = lambda ids: _rz(30.0) if ids[1:] != aux and turned & set(ids) else None
    est = run(model)
    assert est.flipped_chunks == 0
    assert est.chunk_drift_deg[5] == pytest.approx(30.0, abs=0.01)
    assert max(d for c, d in enumerate(est.chunk_drift_deg) if c != 5) < TOL_DRIFT_DEG


def test_reference_is_the_candidate_made_clearly_best(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    baseline = run(probe)
    candidates, _, _ = passes(probe)
    k = int(np.argmin(baseline.candidate_scores))  # the candidate that would otherwise score worst
    favoured = candidates[k]
    assert favoured != baseline.reference

    model = TruthModel(rotations, shifts)
    model.pass_conf[favoured] = 4.0  # its pass: more confident ...
    model.pass_resid[favoured] = 0.25  # ... and a 4x smaller Kabsch residual
    est = run(model)
    assert est.reference == favoured and int(np.argmax(est.candidate_scores)) == k
    np.testing.assert_allclose(est.rotations, relative(rotations, favoured), atol=TOL_ROT)  # its frame


def test_confidence_and_residual_both_count(truth):
    """Residual alone would pick candidate 3; its confidence makes candidate 2 the reference."""
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    candidates, _, _ = passes(probe)
    model = TruthModel(rotations, shifts)
    resid_factor, conf_factor = [1.0, 1.0, 0.6, 0.5], [1.0, 1.0, 4.0, 1.0]
    for c, r, f in zip(candidates, resid_factor, conf_factor):
        model.pass_resid[c], model.pass_conf[c] = r, f
    est = run(model)

    def z(x):
        x = np.asarray(x)
        return (x - x.mean()) / x.std(ddof=1)

    # Each pass's mean confidence is 2 x factor and its median auxiliary residual 0.01 x factor.
    expected = z(2.0 * np.array(conf_factor)) - z(0.01 * np.array(resid_factor))
    np.testing.assert_allclose(est.candidate_scores, expected, atol=1e-3)
    assert est.reference == candidates[2]


def test_with_confidences_tied_the_residual_decides_the_reference(truth):
    rotations, shifts = truth
    probe = TruthModel(rotations, shifts)
    run(probe)
    candidates, _, _ = passes(probe)
    k = 2
    model = TruthModel(rotations, shifts)  # every confidence exactly 2.0: the confidence term is 0
    model.pass_resid[candidates[k]] = 0.25
    est = run(model)
    # Standardised over 4 candidates, one median residual below three equal ones scores 1.5, the others -0.5.
    expected = np.full(4, -0.5)
    expected[k] = 1.5
    np.testing.assert_allclose(est.candidate_scores, expected, atol=1e-3)
    assert est.reference == candidates[k]


def _rz(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)
