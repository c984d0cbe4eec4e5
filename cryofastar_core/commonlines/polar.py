"""Central Fourier lines of a set of views, prepared for matching.

By the projection-slice theorem the 2D transform of view ``i`` at in-plane frequency ``r u_θ`` equals
the volume's transform at ``r R_i u_θ`` (:mod:`cryofastar_core.model.fpm`, ``u_θ = (cos θ, sin θ)``
in ``(x, y)`` = (column, row)). Two views' half-lines with the same 3D direction therefore hold the
same values: the common line. Line ``θ + π`` holds the complex conjugates of line ``θ``.

Before sampling, each image is centred on its centroid (:func:`~cryofastar_core.physics.centre.centroid_shifts`:
a centring that is consistent across views, so the residual shift along a common line is small) and
softly masked to the particle (noise outside it only blurs the lines). The transform is zero-padded
twice so that bilinear sampling on the polar grid interpolates a finely sampled spectrum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cryofastar_core.physics.centre import centroid_shifts
from cryofastar_core.physics.fourier import fft2c, pad_centred
from cryofastar_core.physics.line_transform import line_angles
from cryofastar_core.physics.shift import shift_images
from cryofastar_core.reconstruct.mask import soft_circle_mask

MASK_EDGE_PX = 3.0  # width of the mask's cosine edge


def centre_images(images: Tensor) -> tuple[Tensor, Tensor]:
    """Images ``(N, D, D)`` moved so that each centroid sits at the box centre, and the shifts
    ``(N, 2)`` px (origin convention) that were removed."""
    shifts = centroid_shifts(images.float())
    return shift_images(images.float(), -shifts), shifts


def fit_mask_radius(images: Tensor, floor: float = 0.1) -> float:
    """Radius (px) of the particle in centred images ``(N, D, D)``: where the radial profile of the
    mean image first falls below ``floor`` of its peak, plus the mask edge; within ``[D/8, D/2 − 1]``."""
    d = images.shape[-1]
    mean = images.float().mean(0)
    c = torch.arange(d, dtype=torch.float32, device=images.device) - d // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2).round().long()
    n_r = d // 2
    profile = torch.zeros(n_r, device=images.device).index_add_(0, r.clamp(max=n_r - 1).flatten(), mean.flatten())
    counts = torch.zeros(n_r, device=images.device).index_add_(0, r.clamp(max=n_r - 1).flatten(),
                                                               torch.ones_like(mean).flatten())
    profile = profile / counts.clamp_min(1)
    peak = int(profile.argmax())
    below = torch.nonzero(profile[peak:] < floor * profile[peak]).flatten()
    edge = peak + (int(below[0]) if below.numel() else n_r - 1 - peak)
    return float(min(max(edge + MASK_EDGE_PX, d / 8), d / 2 - 1))


def soft_mask(box: int, radius: float, device=None) -> Tensor:
    """``(D, D)`` 1 inside ``radius`` px of the centre, a cosine edge of :data:`MASK_EDGE_PX`, 0 beyond."""
    return soft_circle_mask(box, radius, MASK_EDGE_PX, device=device)


def fourier_lines(images: Tensor, n_lines: int, radii: Tensor | tuple[float, ...]) -> Tensor:
    """Central lines ``(N, L, K)`` complex64 of (centred, masked) real images ``(N, D, D)``: line ``l``
    at angle ``θ_l = 2π l / L``, sample ``k`` at radius ``radii[k]`` Fourier pixels (cycles per box)."""
    n, d = images.shape[0], images.shape[-1]
    radii = torch.as_tensor(radii, dtype=torch.float32, device=images.device)
    padded = 2 * d
    ft = fft2c(pad_centred(images.float(), padded, 2))  # DC at index ``d``
    theta = line_angles(n_lines, device=images.device, dtype=torch.float64)
    # padded index of radius r along u_θ: d + 2 r u_θ; grid_sample's x is the column, y the row
    x = d + 2 * radii[None, :].double() * torch.cos(theta)[:, None]
    y = d + 2 * radii[None, :].double() * torch.sin(theta)[:, None]
    grid = torch.stack([x, y], -1).float() / (padded - 1) * 2 - 1  # (L, K, 2), align_corners=True
    parts = torch.stack([ft.real, ft.imag], 1)  # (N, 2, 2D, 2D)
    sampled = F.grid_sample(parts, grid.expand(n, -1, -1, -1), mode="bilinear", align_corners=True)
    return torch.complex(sampled[:, 0], sampled[:, 1])  # (N, L, K)
