"""normalize_images: background mean to zero, whole-image std to one, robust to constant images."""
from __future__ import annotations

import torch

from cryofastar_core.physics.normalize import background_mask, normalize_images


def test_background_zero_std_one_and_affine_invariance():
    g = torch.Generator().manual_seed(0)
    D = 48
    c = torch.arange(D) - D // 2
    disc = ((c[:, None] ** 2 + c[None, :] ** 2) < 10 ** 2).float()
    imgs = disc[None] * 3.0 + 0.3 * torch.randn(5, D, D, generator=g)
    out = normalize_images(imgs)
    bg = background_mask(D)
    assert torch.allclose(out[:, bg].mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.std(dim=(-2, -1), unbiased=False), torch.ones(5), atol=1e-5)
    # the particle is positive after normalisation (the background, not the whole image, sets zero)
    assert bool((out[:, D // 2, D // 2] > 0.5).all())
    # an ice offset and gain on real data do not change the result
    assert torch.allclose(normalize_images(imgs * 7.5 - 40.0), out, atol=1e-4)


def test_constant_and_tiny_images_give_no_nan():
    const = torch.full((2, 16, 16), 5.0)
    out = normalize_images(const)
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0
    zeros = normalize_images(torch.zeros(1, 16, 16))
    assert torch.isfinite(zeros).all()
    tiny = normalize_images(torch.randn(3, 3, 3))
    assert torch.isfinite(tiny).all()
    assert torch.allclose(tiny.mean(dim=(-2, -1)), torch.zeros(3), atol=1e-5)
