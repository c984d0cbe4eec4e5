"""Soft spherical (3D) and circular (2D) masks with a raised-cosine edge."""
from __future__ import annotations

import torch
from torch import Tensor


def _soft_edge(r: Tensor, radius: float, width: float) -> Tensor:
    if width <= 0:
        return (r <= radius).to(r.dtype)
    t = ((r - radius) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(torch.pi * t))


def soft_sphere_mask(box: int, radius: float, width: float, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(D, D, D)`` mask: 1 within ``radius`` px of the centre ``D // 2``, a cosine fall-off over ``width``
    px, 0 beyond ``radius + width``."""
    c = torch.arange(box, device=device, dtype=dtype) - box // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return _soft_edge(r, radius, width)


def soft_circle_mask(box: int, radius: float, width: float, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(D, D)`` 2D variant of :func:`soft_sphere_mask`."""
    c = torch.arange(box, device=device, dtype=dtype) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return _soft_edge(r, radius, width)
