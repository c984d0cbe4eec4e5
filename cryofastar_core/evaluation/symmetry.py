"""How nearly a map repeats itself under turns about its principal axes.

Common lines assume one common line per pair of views. A map with a ``C_n`` symmetry has ``n`` (its views at
``R`` and ``g R`` are the same image), and a nearly symmetric one has ``n`` nearly as good: the classical
estimator's whole-sample failures on the evaluation structures are those maps
(``bench/structure_symmetry.py``, ``docs/model-history.md`` session 20). Measured in the map frame
(``x, y, z`` px about the box centre, as :func:`~cryofastar_core.evaluation.metrics.resample_volume`), about the
axes of the density's inertia tensor through its centre of mass, where the axis of a cyclic symmetry lies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryofastar_core.evaluation.metrics import resample_volume
from cryofastar_core.geometry import rotvec_to_matrix
from cryofastar_core.physics.centre import volume_centroid


@dataclass
class SelfMatch:
    """The best turn of a map onto itself: ``order`` ``n`` (a turn by ``360° / n``), the ``axis`` ``(3,)``
    (map frame ``x, y, z``, unit) and the ``correlation`` of the map with itself so turned (1: an exact
    symmetry)."""

    order: int
    axis: np.ndarray
    correlation: float


def _turn(axis: np.ndarray, angle: float) -> np.ndarray:
    """``(3, 3)`` rotation by ``angle`` radians about the unit ``axis``."""
    return rotvec_to_matrix(torch.as_tensor(np.asarray(axis, dtype=np.float64) * angle)).numpy()


def principal_axes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass ``(3,)`` (px, map frame) and the inertia tensor's axes as the columns of ``(3, 3)``, of
    the positive part of ``volume`` ``(D, D, D)`` (``V[z, y, x]``)."""
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    centre = volume_centroid(vol)
    r = torch.arange(vol.shape[-1], dtype=torch.float64) - vol.shape[-1] // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    d = torch.stack([x, y, z], -1).reshape(-1, 3) - centre
    mass = vol.clamp_min(0).reshape(-1)
    inertia = (d.T * mass) @ d / mass.sum()
    return centre.numpy(), np.linalg.eigh(inertia.numpy())[1]


# A map whose self-match under a turn reaches this is taken as symmetric under it: the library's exact
# oligomers read 0.98-0.99, the nearest pseudo-symmetric one (6FLR) 0.91 (bench/structure_symmetry.py).
SYMMETRIC_FROM = 0.95


def symmetry_operators(volume: np.ndarray, min_correlation: float = SYMMETRIC_FROM, orders: range = range(2, 7)) -> np.ndarray:
    """``(n, 3, 3)`` float64: the rotations ``g`` of the map's cyclic symmetry of the highest order whose
    self-match (:func:`cyclic_self_matches`) reaches ``min_correlation``, the identity first; the identity
    alone when there is none. In the map frame, acting on an image-to-map rotation from the left: views at
    ``R`` and ``g R`` of a map centred in its box are the same image (``tests/test_symmetry.py``), so a pose
    is only defined up to them."""
    found = [m for m in cyclic_self_matches(volume, orders) if m.correlation >= min_correlation]
    if not found:
        return np.eye(3)[None]
    best = max(found, key=lambda m: m.order)
    return np.stack([_turn(best.axis, 2 * np.pi * k / best.order) for k in range(best.order)])


def cyclic_self_matches(volume: np.ndarray, orders: range = range(2, 7)) -> list[SelfMatch]:
    """For each of ``orders``, the best of the three principal axes: ``volume`` ``(D, D, D)`` turned by
    ``360° / n`` about it (through the centre of mass, trilinear) against itself."""
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    centre, axes = principal_axes(vol.numpy())
    flat = (vol - vol.mean()).reshape(-1)
    found = []
    for n in orders:
        best = None
        for axis in axes.T:
            turn = _turn(axis, 2 * np.pi / n)
            # out(w) = vol(Gᵀ (w - c) + c): the content turned by G about the centre of mass c
            turned = resample_volume(vol, turn.T, centre - turn @ centre).reshape(-1)
            cc = float(torch.nn.functional.cosine_similarity(flat, turned - turned.mean(), dim=0))
            if best is None or cc > best.correlation:
                best = SelfMatch(order=n, axis=axis.copy(), correlation=cc)
        found.append(best)
    return found
