"""Where a particle sits in its box: the centroid of its low-passed positive density.

By the projection-slice theorem the 2D centre of mass of a projection is the projection of the 3D one,
so the shift that puts every image's centroid at the box centre places the map's origin at the
molecule's centre of mass, for every view alike: a shift estimate that needs neither a model nor a
reference. Low-passing and a mask that follows the estimate keep the noise outside the particle from
pulling it; only positive density counts (protein is positive after the contrast sign and, with a CTF,
phase flipping, which keeps the low frequencies' sign).

How close it comes, against the line model's own shift output, is measured on the model ladder
(``bench/model_accuracy.py`` reports both; tests/test_physics_centre.py checks the convention).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryofastar_core.physics.fourier import fft2c, freq_grid_2d, ifft2c


def centroid_shifts(images: Tensor, lowpass: float = 0.05, radius_fraction: float = 0.4,
                    iterations: int = 3) -> Tensor:
    """Shifts ``(B, 2)`` px ``(x, y)`` in the origin convention (:mod:`~.shift`) of images ``(B, D, D)``.

    ``lowpass``: the Gaussian filter's width in cycles/px; ``radius_fraction``: the mask's radius as a
    fraction of ``D``, centred at the current estimate, which starts at the box centre and is updated
    ``iterations`` times. An image with no positive density keeps shift 0.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (B, D, D), got {tuple(images.shape)}")
    x = images if images.is_floating_point() else images.float()
    d = x.shape[-1]
    k2 = (freq_grid_2d(d, device=x.device, dtype=x.dtype) ** 2).sum(-1)
    density = ifft2c(fft2c(x) * torch.exp(-k2 / (2 * lowpass ** 2))).real.clamp_min(0)
    r = torch.arange(d, device=x.device, dtype=x.dtype) - d // 2
    py, px = torch.meshgrid(r, r, indexing="ij")
    centre = torch.zeros(x.shape[0], 2, device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        inside = (px - centre[:, 0, None, None]) ** 2 + (py - centre[:, 1, None, None]) ** 2 < (radius_fraction * d) ** 2
        w = density * inside
        mass = w.sum(dim=(-2, -1))
        found = torch.stack([(w * px).sum(dim=(-2, -1)), (w * py).sum(dim=(-2, -1))], -1) / mass.clamp_min(1e-12)[:, None]
        centre = torch.where((mass > 0)[:, None], found, centre)
    # The particle appears at -s in the origin convention (image(p) = centred(p + s)).
    return -centre


def volume_centroid(volume: Tensor, mask: Tensor | None = None) -> Tensor:
    """Centre of mass ``(3,)`` px ``(x, y, z)`` about the box centre ``D // 2`` of a volume's positive
    density ``(D, D, D)`` (``V[z, y, x]``), weighted by ``mask`` if given; zeros for an empty volume."""
    d = volume.shape[-1]
    w = volume.to(torch.float64).clamp_min(0)
    if mask is not None:
        w = w * mask.to(w)
    r = torch.arange(d, device=volume.device, dtype=torch.float64) - d // 2
    mass = w.sum()
    if float(mass) <= 0:
        return torch.zeros(3, dtype=torch.float64, device=volume.device)
    return torch.stack([(w * r[None, None, :]).sum(), (w * r[None, :, None]).sum(), (w * r[:, None, None]).sum()]) / mass
