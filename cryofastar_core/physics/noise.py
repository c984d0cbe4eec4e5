"""Additive white Gaussian noise at a given SNR."""
from __future__ import annotations

import torch
from torch import Tensor


def add_noise(images: Tensor, snr: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Noisy copies of ``images`` ``(B, D, D)``: white Gaussian noise with per-image
    ``sigma^2 = var(clean image over the whole box) / snr`` (no particle mask
    needed, but the SNR then depends on how much of the box the particle fills). ``snr``: float or ``(B,)``.

    Noise is drawn on the generator's device (for reproducibility across devices) and moved to the images'.
    """
    snr_t = torch.as_tensor(snr, dtype=images.dtype, device=images.device).reshape(-1, *([1] * (images.ndim - 1)))
    var = images.var(dim=tuple(range(1, images.ndim)), keepdim=True, unbiased=False)
    sigma = torch.sqrt(var / snr_t)
    gen_device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, device=gen_device, dtype=images.dtype).to(images.device)
    return images + sigma * noise
