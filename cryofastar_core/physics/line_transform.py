"""The line transform: each image's 1D projections (its sinogram rows) at ``L`` in-plane angles.

Line ``l`` of an image is the image summed along the direction perpendicular to
``u_l = (cos θ_l, sin θ_l)``, ``θ_l = 2π l / L``, sampled at ``S`` offsets ``s`` along ``u_l``:

    p(θ, s) = ∫ P(c + s u_θ + t u_θ⊥) dt,     u_θ⊥ = (−sin θ, cos θ),   c = (D // 2, D // 2)

with ``(x, y)`` = (column, row), the axes of :func:`cryofastar_core.model.fpm.planar_grid`. Since the
image is ``P(x, y) = Σ_z V(R (x, y, z))`` (:mod:`cryofastar_core.physics.projection`), line θ is the
1D marginal of the volume along the 3D direction ``R u_θ``: two views whose lines share a 3D
direction have equal lines (the common line), and line ``θ + π`` is line ``θ`` reversed.

The integral runs over the disk of radius ``D/2 − 1`` about the centre, so rotating an image about
its centre by one line step ``2π / L`` shifts its lines cyclically by one (corners would break that).
Each of the ``S`` samples averages its bin of width ``(D − 2) / S`` along ``s``.

The transform is linear, so it is one matrix ``(D², L·S)`` built once per geometry and device and
applied as a matmul: batched and fast on CPU and GPU alike.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

SUBSTEP_PX = 0.5  # sampling step of the line integral and of each bin, in pixels


def line_angles(n_lines: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``θ_l = 2π l / L`` ``(L,)``."""
    return torch.arange(n_lines, device=device, dtype=torch.float64).mul(2 * math.pi / n_lines).to(dtype)


def line_directions(n_lines: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """In-plane unit directions ``u_l = (cos θ_l, sin θ_l, 0)`` ``(L, 3)`` in the image frame."""
    theta = line_angles(n_lines, dtype=torch.float64)
    u = torch.stack([torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)], dim=-1)
    return u.to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def _operator_numpy(box: int, n_lines: int, n_samples: int) -> np.ndarray:
    radius = box / 2 - 1
    c = box // 2
    bin_width = 2 * radius / n_samples
    n_sub = max(1, math.ceil(bin_width / SUBSTEP_PX))
    # offsets along the line: bin centres plus sub-steps inside each bin
    sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    s = (-radius + bin_width * (np.arange(n_samples)[:, None] + 0.5 + sub[None, :]))  # (S, n_sub)
    n_t = int(2 * radius / SUBSTEP_PX) + 1
    t = np.linspace(-radius, radius, n_t)
    theta = 2 * np.pi * np.arange(n_lines) / n_lines
    cos, sin = np.cos(theta), np.sin(theta)
    # positions (L, S, n_sub, T)
    ss = s[None, :, :, None]
    tt = t[None, None, None, :]
    x = c + ss * cos[:, None, None, None] - tt * sin[:, None, None, None]
    y = c + ss * sin[:, None, None, None] + tt * cos[:, None, None, None]
    inside = (ss ** 2 + tt ** 2 <= radius ** 2) & np.ones_like(x, dtype=bool)
    col = (np.arange(n_lines)[:, None] * n_samples + np.arange(n_samples)[None, :])  # (L, S)
    col = np.broadcast_to(col[:, :, None, None], x.shape)
    x, y, col = x[inside], y[inside], col[inside]
    weight = SUBSTEP_PX / n_sub  # dt times the bin average
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    op = np.zeros((box * box, n_lines * n_samples), dtype=np.float64)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < box) & (yi >= 0) & (yi < box)
        np.add.at(op, (yi[ok] * box + xi[ok], col[ok]), weight * w[ok])
    return op.astype(np.float32)


_DEVICE_CACHE: dict[tuple, Tensor] = {}


def line_operator(box: int, n_lines: int, n_samples: int, device=None) -> Tensor:
    """The matrix ``(D², L·S)`` float32 with ``lines = images.reshape(N, D²) @ M``, cached per device."""
    if box < 8 or n_lines < 2 or n_samples < 2:
        raise ValueError(f"need box >= 8, n_lines >= 2 and n_samples >= 2, got {box}, {n_lines}, {n_samples}")
    key = (box, n_lines, n_samples, str(torch.device(device) if device is not None else "cpu"))
    op = _DEVICE_CACHE.get(key)
    if op is None:
        op = torch.from_numpy(_operator_numpy(box, n_lines, n_samples)).to(device)
        _DEVICE_CACHE[key] = op
    return op


def line_transform(images: Tensor, n_lines: int, n_samples: int) -> Tensor:
    """Lines of real images ``(..., D, D)`` -> ``(..., L, S)`` (same dtype; the sum runs in fp32)."""
    box = images.shape[-1]
    if images.shape[-2] != box:
        raise ValueError(f"images must be square, got {tuple(images.shape)}")
    op = line_operator(box, n_lines, n_samples, images.device)
    flat = images.reshape(-1, box * box).float()
    return (flat @ op).reshape(*images.shape[:-2], n_lines, n_samples).to(images.dtype)
