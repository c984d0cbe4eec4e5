"""Integer balls of search offsets, shared by the local refinement (rotations and shifts, with each
point's grid neighbours for the parabolic sub-grid peak), the global pass (shifts) and the map
registration (rotations); and the parabolic vertex by which a peak on a grid is placed between its points."""
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


def perturbation_grid(step_deg: float, radius_deg: float) -> Tensor:
    """Rotation vectors ``(J, 3)`` (radians) on a cubic grid of spacing ``step_deg`` inside a ball of
    ``radius_deg``; the identity comes first."""
    g, _ = ball_grid(3, radius_deg / step_deg)
    return torch.deg2rad(g.double() * step_deg)


def shift_grid(step_px: float, radius_px: float) -> Tensor:
    """Shift offsets ``(T, 2)`` (px) on a square grid of spacing ``step_px`` inside a disc of ``radius_px``;
    zero first."""
    g, _ = ball_grid(2, radius_px / step_px)
    return g.double() * step_px


def parabola_vertex(lo: Tensor, mid: Tensor, hi: Tensor) -> Tensor:
    """Offset, in grid steps within ``[-0.5, 0.5]``, of the vertex of the parabola through three equally
    spaced values (``lo`` at -1, ``mid`` at 0, ``hi`` at +1; any broadcastable shapes); 0 where the three
    do not bend downwards (no peak in between)."""
    curv = lo - 2 * mid + hi
    ok = curv < 0
    off = 0.5 * (lo - hi) / torch.where(ok, curv, torch.ones_like(curv))
    return torch.where(ok, off.clamp(-0.5, 0.5), torch.zeros_like(off))
