"""The one image normalisation shared by training and inference.

Rule, per image: subtract the mean of the background (pixels outside a circle of radius
``0.85 * D / 2``), then divide by the standard deviation over the whole image.

Why: the background mean is the solvent/ice level, which carries no particle signal; removing it puts
zero where the particle is absent, for simulated images (zero outside the particle plus noise) and real
ones (arbitrary ice offset) alike, whereas the whole-image mean depends on how much of the box the
particle fills. Dividing by the whole-image std matches the way simulated noise is defined (variance
over the whole box, ``noise.add_noise``), so at a given SNR synthetic and real images land on the same
scale; at low SNR the std is dominated by the noise and is stable. Fallbacks: if fewer than 8 pixels
lie outside the circle (tiny boxes), the whole-image mean is used; an image whose std is ~0 (constant)
becomes all zeros instead of NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

BACKGROUND_RADIUS_FRACTION = 0.85


def background_mask(box: int, device=None, radius_fraction: float = BACKGROUND_RADIUS_FRACTION) -> Tensor:
    """Boolean ``(D, D)``: True outside the circle of radius ``radius_fraction * D / 2`` around ``D // 2``."""
    c = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return r2 > (radius_fraction * box / 2) ** 2


def normalize_images(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalised copies of real images ``(B, D, D)`` (see the module docstring for the rule)."""
    x = images if images.is_floating_point() else images.float()
    D = x.shape[-1]
    bg = background_mask(D, device=x.device)
    if int(bg.sum()) >= 8:
        mean = (x * bg).sum(dim=(-2, -1), keepdim=True) / bg.sum()
    else:
        mean = x.mean(dim=(-2, -1), keepdim=True)
    x = x - mean
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    scale = torch.abs(images.float()).amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    # A constant (or all-zero) image: leave the mean-subtracted image (zeros) rather than divide by ~0.
    safe = std > eps * scale
    return torch.where(safe, x / torch.where(safe, std, torch.ones_like(std)), torch.zeros_like(x))
