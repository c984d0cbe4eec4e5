"""How nearly a map repeats itself under turns about its principal axes.

Common lines assume one common line per pair of views. A map with a ``C_n`` symmetry has ``n`` (its views at
``R`` and ``g R`` are the same image), and a nearly symmetric one has ``n`` nearly as good: the classical
estimator's whole-sample failures on the evaluation structures are those maps
(``bench/structure_symmetry.py``, ``docs/model-history.md`` session 20). Measured in array index space
(axes ``z, y, x``), about the axes of the density's inertia tensor through its centre of mass, where the axis
of a cyclic symmetry lies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import affine_transform


@dataclass
class SelfMatch:
    """The best turn of a map onto itself: ``order`` ``n`` (a turn by ``360° / n``), the ``axis`` ``(3,)``
    (array index order ``z, y, x``, unit) and the ``correlation`` of the map with itself so turned (1: an
    exact symmetry)."""

    order: int
    axis: np.ndarray
    correlation: float


def _turn(axis: np.ndarray, angle: float) -> np.ndarray:
    """``(3, 3)`` rotation by ``angle`` radians about the unit ``axis`` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def principal_axes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass ``(3,)`` (index units) and the inertia tensor's axes as the columns of ``(3, 3)``, of
    the positive part of ``volume`` ``(D, D, D)``."""
    w = np.clip(np.asarray(volume, dtype=np.float64), 0, None)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in w.shape], indexing="ij"), -1).reshape(-1, 3)
    mass = w.reshape(-1)
    centre = (grid * mass[:, None]).sum(0) / mass.sum()
    d = grid - centre
    inertia = (d[:, :, None] * d[:, None, :] * mass[:, None, None]).sum(0) / mass.sum()
    return centre, np.linalg.eigh(inertia)[1]


# A map whose self-match under a turn reaches this is taken as symmetric under it: the library's exact
# oligomers read 0.98-0.99, the nearest pseudo-symmetric one (6FLR) 0.91 (bench/structure_symmetry.py).
SYMMETRIC_FROM = 0.95


def symmetry_operators(volume: np.ndarray, min_correlation: float = SYMMETRIC_FROM, orders: range = range(2, 7)) -> np.ndarray:
    """``(n, 3, 3)`` float64: the rotations ``g`` of the map's cyclic symmetry of the highest order whose
    self-match (:func:`cyclic_self_matches`) reaches ``min_correlation``, the identity first; the identity
    alone when there is none. In the map frame (``x, y, z``), acting on an image-to-map rotation from the
    left: views at ``R`` and ``g R`` of a map centred in its box are the same image
    (``tests/test_symmetry.py``), so a pose is only defined up to them."""
    found = [m for m in cyclic_self_matches(volume, orders) if m.correlation >= min_correlation]
    if not found:
        return np.eye(3)[None]
    best = max(found, key=lambda m: m.order)
    axis = best.axis[::-1].copy()  # array index order (z, y, x) -> map (x, y, z); the group is the same either sense
    return np.stack([_turn(axis, 2 * np.pi * k / best.order) for k in range(best.order)])


def cyclic_self_matches(volume: np.ndarray, orders: range = range(2, 7)) -> list[SelfMatch]:
    """For each of ``orders``, the best of the three principal axes: ``volume`` ``(D, D, D)`` turned by
    ``360° / n`` about it (through the centre of mass, linear interpolation) against itself."""
    vol = np.asarray(volume, dtype=np.float64)
    centre, axes = principal_axes(vol)
    flat = vol.reshape(-1) - vol.mean()
    found = []
    for n in orders:
        best = None
        for axis in axes.T:
            turn = _turn(axis, 2 * np.pi / n)
            turned = affine_transform(vol, turn, offset=centre - turn @ centre, order=1).reshape(-1)
            cc = float(np.dot(flat, turned - turned.mean()) / (np.linalg.norm(flat) * np.linalg.norm(turned - turned.mean())))
            if best is None or cc > best.correlation:
                best = SelfMatch(order=n, axis=axis.copy(), correlation=cc)
        found.append(best)
    return found
