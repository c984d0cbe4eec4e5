"""``evaluation.symmetry``: a planted cyclic symmetry is found at its order, and an asymmetric map has none."""
from __future__ import annotations

import numpy as np

from _volumes import blob_volume
from cryofastar_core.evaluation.symmetry import _turn, cyclic_self_matches


def _c3(box: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Blobs plus two copies turned by 120° and 240° about a tilted axis (map frame) through the box centre."""
    from cryofastar_core.evaluation.metrics import rotate_volume

    axis = np.array([0.8, 0.36, -0.48])
    axis /= np.linalg.norm(axis)
    blobs = blob_volume(box, n_blobs=6, seed=4).double()
    out = blobs.clone()
    for k in (1, 2):
        out += rotate_volume(blobs, _turn(axis, 2 * np.pi * k / 3))
    return out.numpy(), axis


def test_a_planted_three_fold_is_found_about_its_axis_and_an_asymmetric_map_has_none():
    vol, axis = _c3()
    matches = {m.order: m for m in cyclic_self_matches(vol, range(2, 5))}
    assert matches[3].correlation > 0.95
    assert abs(float(matches[3].axis @ axis)) > 0.99
    # a smooth map turned by 90° instead of 120° still overlaps itself a good deal: orders are told apart by
    # how far the planted one stands above the rest
    assert max(matches[2].correlation, matches[4].correlation) < matches[3].correlation - 0.1
    plain = cyclic_self_matches(blob_volume(32, n_blobs=6, seed=4).numpy(), range(2, 5))
    print([round(m.correlation, 3) for m in plain], [round(m.correlation, 3) for m in matches.values()])
    assert max(m.correlation for m in plain) < 0.85


def test_a_symmetric_maps_views_at_r_and_g_r_are_the_same_image_and_the_ladder_counts_them_alike():
    """``symmetry_operators`` in the simulator's frame: projections at ``R`` and ``g R`` agree; an asymmetric
    map gets the identity alone; and ``validation_errors`` with them scores a prediction off by ``g`` as 0."""
    import torch

    from cryofastar_core.evaluation.symmetry import symmetry_operators
    from cryofastar_core.geometry import random_rotations
    from cryofastar_core.physics.projection import prepare_volume
    from cryofastar_core.simulation.images import simulate_images
    from cryofastar_core.training.trainer import _hand_resolved_errors

    vol, _ = _c3()
    ops = symmetry_operators(vol)
    assert ops.shape == (3, 3, 3) and np.allclose(ops[0], np.eye(3))
    assert symmetry_operators(blob_volume(32, n_blobs=6, seed=4).numpy()).shape == (1, 3, 3)
    vft = prepare_volume(torch.as_tensor(vol, dtype=torch.float32))
    R = random_rotations(5, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    plain, _ = simulate_images(vft, R)
    for g in torch.as_tensor(ops[1:], dtype=torch.float32):
        turned, _ = simulate_images(vft, g @ R)
        cc = torch.nn.functional.cosine_similarity(plain.flatten(1), turned.flatten(1))
        assert float(cc.min()) > 0.99, cc
    # a prediction whose views 2 and 4 are the truth turned by g: wrong plainly, right modulo the symmetry
    R64 = R.double()[None]
    g = torch.as_tensor(ops[1])
    moved = R64.clone()
    moved[0, [2, 4]] = g @ R64[0, [2, 4]]
    pred = moved[:, :1].transpose(-1, -2) @ moved[:, 1:]
    assert float(_hand_resolved_errors(pred, R64).max()) > 30
    assert float(_hand_resolved_errors(pred, R64, torch.as_tensor(ops)).max()) < 0.05   # float32 truth
