"""Integer balls of search offsets, shared by the local refinement (rotations and shifts, with each
point's grid neighbours for the parabolic sub-grid peak) and the map registration (rotations)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def ball_grid(ndim: int, radius_steps: float) -> tuple[Tensor, Tensor]:
    """Integer points ``(J, ndim)`` with norm ``<= radius_steps`` (origin first, then by norm), and for each
    point and axis the index of its neighbours at ``-1`` and ``+1`` along that axis, ``(J, ndim, 2)``
    (``-1`` where the neighbour lies outside the ball)."""
    n = int(math.floor(radius_steps + 1e-9))
    r = torch.arange(-n, n + 1, dtype=torch.int64)
    g = torch.stack(torch.meshgrid(*([r] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    norm2 = (g * g).sum(-1)
    g = g[norm2 <= radius_steps ** 2 + 1e-9]
    g = g[torch.argsort((g * g).sum(-1), stable=True)]
    side = 2 * n + 3  # one spare cell on each side so that neighbours of edge points have a slot
    weights = side ** torch.arange(ndim)
    lookup = torch.full((side ** ndim,), -1, dtype=torch.int64)
    lookup[((g + n + 1) * weights).sum(-1)] = torch.arange(g.shape[0])
    nb = torch.empty(g.shape[0], ndim, 2, dtype=torch.int64)
    for a in range(ndim):
        for k, sgn in enumerate((-1, 1)):
            h = g.clone()
            h[:, a] += sgn
            nb[:, a, k] = lookup[((h + n + 1) * weights).sum(-1)]
    return g, nb
