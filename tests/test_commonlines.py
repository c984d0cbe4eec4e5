"""Classical common lines (cryofastar_core.commonlines): exact geometry recovers exact rotations, the
robust refinement survives wrong common lines, and clean projections give sub-degree poses."""
from __future__ import annotations

import math

import numpy as np
import torch

from cryofastar_core.commonlines import CommonLinesConfig, CommonLinesPoser, estimate_rotations
from cryofastar_core.commonlines.learned import true_common_lines
from cryofastar_core.commonlines.sync import refine_rotations, relative_blocks, synchronize, vote_dihedral_angles
from cryofastar_core.geometry import mirror_rotations, random_rotations, rotation_angle_deg
from cryofastar_core.inference.preprocess import to_model_input
from cryofastar_core.io import read_map
from cryofastar_core.model import denormalize, kabsch
from cryofastar_core.physics.projection import project

from _class2d import DEMO_MAP


def relative_error_deg(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-view error of ``R_0ᵀ R_i`` with the better of the two hands (common lines cannot fix it)."""
    t = truth[:1].transpose(-1, -2) @ truth
    errs = [rotation_angle_deg(e[:1].transpose(-1, -2) @ e, t.to(e)) for e in (estimate, mirror_rotations(estimate))]
    return min(errs, key=lambda x: float(x.median()))


def test_synchronisation_recovers_exact_rotations_from_true_common_lines():
    R = random_rotations(30, torch.Generator().manual_seed(1), dtype=torch.float64)
    angles = true_common_lines(R)
    cos_theta, weight = vote_dihedral_angles(angles)
    assert torch.allclose(cos_theta, R[:, :, 2] @ R[:, :, 2].T, atol=1e-9)  # the spherical law of cosines
    unweighted = synchronize(relative_blocks(angles, cos_theta))
    assert float(relative_error_deg(unweighted, R).max()) < 1e-3
    refined = refine_rotations(synchronize(relative_blocks(angles, cos_theta), weight), angles, weight)
    assert float(relative_error_deg(refined, R).max()) < 1e-3
    assert torch.allclose(torch.linalg.det(refined), torch.ones(30, dtype=refined.dtype))


def test_refinement_survives_wrong_common_lines():
    g = torch.Generator().manual_seed(3)
    R = random_rotations(40, g, dtype=torch.float64)
    angles = true_common_lines(R)
    wrong = torch.rand(40, 40, generator=g) < 0.2
    wrong = wrong | wrong.T
    angles[wrong] = torch.rand(int(wrong.sum()), generator=g, dtype=torch.float64) * 2 * math.pi
    cos_theta, weight = vote_dihedral_angles(angles)
    start = synchronize(relative_blocks(angles, cos_theta), weight)
    refined = refine_rotations(start, angles, weight)
    # a fifth of the pairs random: the refined poses stay near exact, the spectral start does not
    assert float(relative_error_deg(refined, R).median()) < 0.5
    assert float(relative_error_deg(start, R).median()) > 2 * float(relative_error_deg(refined, R).median())


def test_clean_projections_give_subdegree_poses_and_exact_kabsch_planes():
    vol, _ = read_map(DEMO_MAP)
    R = random_rotations(16, torch.Generator().manual_seed(5))
    images = to_model_input(project(torch.from_numpy(vol).float(), R), 64)
    est = estimate_rotations(images, CommonLinesConfig())
    assert float(relative_error_deg(est.rotations, R.double()).median()) < 1.0
    assert float(est.support.min()) > 0.5  # nearly every third view agrees on clean images
    # the pose-model wrapper hands Kabsch planes that return its rotations exactly
    out = CommonLinesPoser()(images[None])
    fit = kabsch(denormalize(out.xyz.double()), out.conf.double(), 64, out.grid.double())
    rel = est.rotations[:1].transpose(-1, -2) @ est.rotations
    assert float(rotation_angle_deg(fit.rotation[0], rel).max()) < 1e-3
    assert np.allclose(1 - 1 / out.conf[0, :, 0, 0].numpy(), est.support.clamp(0, 0.999).numpy(), atol=1e-5)


def test_common_lines_score_one_reference_candidate(tiny_weights):
    from cryofastar_core.inference.pose_model import load_pose_model, reference_candidates

    assert reference_candidates(CommonLinesPoser(), 64) == 1  # every candidate would be a full closed-form solve
    assert reference_candidates(load_pose_model(tiny_weights), 64) == 64
