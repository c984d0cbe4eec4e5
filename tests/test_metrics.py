"""Pose and map metrics: global frame and hand alignment, errors, map resampling, FSC resolution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_asymmetric_map
from cryofastar_core.geometry import mirror_rotations, random_rotations, rotvec_to_matrix
from cryofastar_core.evaluation.metrics import (align_map_to_truth, align_rotations, map_resolution, resample_volume,
                                     rotate_volume, rotation_errors, translation_errors)
from cryofastar_core.physics.projection import project

F = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def _rots(n, seed):
    return random_rotations(n, torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_poses_have_zero_error():
    R = _rots(30, 0)
    e = rotation_errors(R, R)
    assert e["median_deg"] < 1e-5 and e["mean_deg"] < 1e-5 and e["mean_fnorm"] < 1e-9
    assert e["mirrored"] is False
    np.testing.assert_allclose(e["G"], np.eye(3), atol=1e-9)


def test_global_rotation_and_mirror_recovered_exactly():
    R_true = _rots(40, 1)
    G0 = _rots(1, 2)[0]
    # A prediction in another map frame: the map is V_true(G0 x), its poses G0^T R_true.
    G, mirrored = align_rotations(G0.T @ R_true, R_true)
    assert not mirrored
    np.testing.assert_allclose(G, G0.numpy(), atol=1e-9)
    # ... and in the other hand as well.
    G, mirrored = align_rotations(mirror_rotations(G0.T @ R_true), R_true)
    assert mirrored
    np.testing.assert_allclose(G, G0.numpy(), atol=1e-9)  # F (F G0^T R F) F = G0^T R
    e = rotation_errors(mirror_rotations(G0.T @ R_true), R_true)
    assert e["mirrored"] and e["median_deg"] < 1e-5 and e["mean_fnorm"] < 1e-8
    # Without the mirror test the mirrored prediction is far off.
    assert rotation_errors(mirror_rotations(G0.T @ R_true), R_true, allow_mirror=False)["median_deg"] > 20


def test_known_perturbation_gives_its_angle():
    n, theta = 60, 5.0
    R_true = _rots(n, 3)
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=-1)
    dR = rotvec_to_matrix(axes * math.radians(theta))
    G0 = _rots(1, 5)[0]
    R_pred = G0.T @ (R_true @ dR)
    e = rotation_errors(R_pred, R_true)
    # Random perturbation axes average out: the global fit stays near G0, every error near theta.
    assert e["median_deg"] == pytest.approx(theta, abs=0.2)
    assert e["mean_fnorm"] == pytest.approx(2 * math.sqrt(2) * math.sin(math.radians(theta) / 2), rel=0.05)


def test_translation_errors():
    t_true = np.zeros((4, 2))
    t_pred = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, -2.0]])
    e = translation_errors(t_pred, t_true)
    assert e["mean_px"] == pytest.approx(2.0)
    assert e["median_px"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        translation_errors(np.zeros((3, 2)), np.zeros((4, 2)))


def test_rotate_volume_moves_content_by_G():
    n = 24
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    vol[12, 12, 12 + 6] = 1.0  # a point at (x, y, z) = (6, 0, 0) about the centre
    G = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # x -> y
    out = rotate_volume(vol, G)
    assert tuple(int(i) for i in np.unravel_index(int(out.argmax()), out.shape)) == (12, 12 + 6, 12)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-9)


def test_map_in_predicted_frame_gives_same_images_and_aligns_back():
    truth = torch.from_numpy(make_asymmetric_map(24, seed=3)).double()
    R_true = _rots(6, 6)
    G0 = _rots(1, 7)[0]
    for mirrored in (False, True):
        M = G0 @ F if mirrored else G0
        pred_map = resample_volume(truth, M)  # V_pred(y) = V_true(G0 [F] y)
        R_pred = G0.T @ R_true if not mirrored else mirror_rotations(G0.T @ R_true)
        p_true = project(truth.float(), R_true.float())
        p_pred = project(pred_map.float(), R_pred.float())
        assert float((p_true - p_pred).norm() / p_true.norm()) < 0.08  # interpolation error only
        G, m = align_rotations(R_pred, R_true)
        assert m == mirrored
        back = align_map_to_truth(pred_map, G, m)
        assert float((back - truth).norm() / truth.norm()) < 0.2
        aligned = map_resolution(pred_map, truth, 3.0, 0.5, G=G, mirrored=m, try_mirror=False)
        unaligned = map_resolution(pred_map, truth, 3.0, 0.5, try_mirror=False)
        assert aligned < 7.0 and unaligned > 2 * aligned


def test_map_resolution_identical_and_mirror():
    truth = torch.from_numpy(make_asymmetric_map(24, seed=1)).double()
    assert map_resolution(truth, truth, 2.0) == pytest.approx(4.0)  # Nyquist
    mirror = torch.flip(truth, dims=[0])
    mirror = torch.roll(mirror, 1, dims=0) if truth.shape[0] % 2 == 0 else mirror  # keep centre n//2 fixed
    assert map_resolution(mirror, truth, 2.0, try_mirror=True) == pytest.approx(4.0, rel=0.05)
    assert map_resolution(mirror, truth, 2.0, try_mirror=False) > 8.0


def test_mate_errors_find_a_pseudo_symmetry_flip_and_measure_modulo_it():
    """40 % of the particles put at the 180° mate about a fixed map axis (plus 1° of noise for everyone), the
    whole set in another frame: the plain median lands among the flipped, the mate errors find the
    operation, the fraction and the 1° underneath; a set without mates reports none."""
    from scipy.spatial.transform import Rotation

    from cryofastar_core.evaluation.metrics import mate_errors, rotation_errors

    rng = np.random.default_rng(4)
    n = 2000
    truth = Rotation.random(n, random_state=5)
    noise = Rotation.from_rotvec(rng.normal(size=(n, 3)) * np.deg2rad(1.0) / np.sqrt(3))
    mate = Rotation.from_rotvec(np.pi * np.array([0.6, 0.8, 0.0]))
    flipped = rng.random(n) < 0.4
    pred = noise * truth
    pred = Rotation.concatenate([mate * pred[i] if flipped[i] else pred[i] for i in range(n)])
    frame = Rotation.from_rotvec([0.3, -1.1, 0.4])
    R_pred = torch.as_tensor((frame * pred).as_matrix())
    R_true = torch.as_tensor(truth.as_matrix())
    m = mate_errors(R_pred, R_true)
    assert abs(m["mate_fraction"] - flipped.mean()) < 0.01
    assert abs(m["mate_angle_deg"] - 180.0) < 1.0 and m["mate_spread_deg"] < 2.0
    assert 0.5 < m["median_deg_modulo_mate"] < 1.5
    assert m["median_deg_modulo_mate"] < rotation_errors(R_pred, R_true)["median_deg"]
    clean = mate_errors(torch.as_tensor((frame * (noise * truth)).as_matrix()), R_true)
    assert clean["mate_angle_deg"] is None and clean["mate_fraction"] < 0.02


def test_origin_aligned_shift_errors_remove_one_offset_of_the_frame():
    """Shifts made by moving the map's origin by o (plus 0.1 px of noise): the raw error is o's projection,
    the origin-aligned one the noise, and |o| is recovered."""
    from cryofastar_core.evaluation.metrics import translation_errors_origin_aligned
    from cryofastar_core.refine.map_registration import shifts_after_moving_map

    g = torch.Generator().manual_seed(8)
    R = _rots(3000, 8)
    s = torch.rand(3000, 2, generator=g, dtype=torch.float64) * 4 - 2
    o = torch.tensor([0.4, -0.2, 0.45], dtype=torch.float64)
    moved = shifts_after_moving_map(R, s, o) + 0.1 * torch.randn(3000, 2, generator=g, dtype=torch.float64)
    raw = translation_errors(moved, s)["median_px"]
    aligned = translation_errors_origin_aligned(moved, s, R)
    assert raw > 0.3 and aligned["median_px"] < 0.15
    assert abs(aligned["origin_offset_px"] - float(o.norm())) < 0.02
