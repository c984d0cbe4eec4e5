"""``evaluation.symmetry``: a planted cyclic symmetry is found at its order, and an asymmetric map has none."""
from __future__ import annotations

import numpy as np

from _volumes import blob_volume
from cryofastar_core.evaluation.symmetry import _turn, cyclic_self_matches


def _c3(box: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Blobs plus two copies turned by 120° and 240° about a tilted axis through the box centre."""
    from scipy.ndimage import affine_transform

    axis = np.array([0.8, 0.36, -0.48])
    axis /= np.linalg.norm(axis)
    blobs = blob_volume(box, n_blobs=6, seed=4).numpy().astype(np.float64)
    c = np.full(3, box // 2, dtype=np.float64)
    out = blobs.copy()
    for k in (1, 2):
        turn = _turn(axis, 2 * np.pi * k / 3)
        out += affine_transform(blobs, turn, offset=c - turn @ c, order=1)
    return out, axis


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
