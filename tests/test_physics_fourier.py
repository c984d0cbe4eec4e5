"""Centred FFTs, frequency grids, Fourier crop/pad."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofastar_core.physics.fourier import (fft2c, fft3c, fourier_crop, fourier_crop_volume, fourier_pad,
                                             fourier_pad_volume, freq_grid_2d, ifft2c, ifft3c)


@pytest.mark.parametrize("n", [16, 17])
def test_centred_fft_conventions(n):
    x = torch.randn(3, n, n, dtype=torch.float64)
    F = fft2c(x)
    # DC at n // 2, equal to the pixel sum (unnormalised forward transform)
    assert torch.allclose(F[:, n // 2, n // 2].real, x.sum((-2, -1)))
    assert torch.allclose(ifft2c(F).real, x)
    # a point at the centre index has a flat, real transform
    d = torch.zeros(n, n, dtype=torch.float64)
    d[n // 2, n // 2] = 1
    assert torch.allclose(fft2c(d), torch.ones(n, n, dtype=torch.complex128))
    v = torch.randn(n, n, n, dtype=torch.float64)
    assert torch.allclose(ifft3c(fft3c(v)).real, v)
    assert torch.allclose(fft3c(v)[n // 2, n // 2, n // 2].real, v.sum())


def test_freq_grid_matches_numpy():
    g = freq_grid_2d(8)
    k = np.fft.fftshift(np.fft.fftfreq(8))
    assert g.shape == (8, 8, 2)
    assert np.allclose(g[0, :, 0].numpy(), k) and np.allclose(g[:, 0, 1].numpy(), k)
    assert float(g[4, 4].abs().sum()) == 0.0


def test_fourier_crop_keeps_mean_and_band_limited_content():
    gen = torch.Generator().manual_seed(0)
    D, d = 64, 32
    # a band-limited image (support well inside the small box's Nyquist): crop is exact up to float error
    F = torch.zeros(2, D, D, dtype=torch.complex128)
    F[:, D // 2 - 8:D // 2 + 9, D // 2 - 8:D // 2 + 9] = torch.randn(2, 17, 17, dtype=torch.complex128, generator=gen)
    img = ifft2c(F).real + 3.0
    small = fourier_crop(img, d)
    assert small.shape == (2, d, d)
    assert torch.allclose(small.mean((-2, -1)), img.mean((-2, -1)))
    back = fourier_pad(small, D)
    assert torch.allclose(back, img, atol=1e-10)
    # values are preserved: a sample of the small image equals the big one at the same physical place
    assert torch.allclose(small[:, d // 2, d // 2], img[:, D // 2, D // 2], atol=1e-10)


def test_fourier_crop_volume_roundtrip():
    gen = torch.Generator().manual_seed(1)
    D, d = 24, 16
    F = torch.zeros(D, D, D, dtype=torch.complex128)
    s = slice(D // 2 - 4, D // 2 + 5)
    F[s, s, s] = torch.randn(9, 9, 9, dtype=torch.complex128, generator=gen)
    vol = ifft3c(F).real + 1.0
    small = fourier_crop_volume(vol, d)
    assert torch.allclose(small.mean(), vol.mean())
    assert torch.allclose(fourier_pad_volume(small, D), vol, atol=1e-10)
    with pytest.raises(ValueError):
        fourier_crop_volume(small, D)


@pytest.mark.parametrize("D,d", [(16, 8), (64, 32), (64, 10), (256, 64)])
def test_fourier_crop_of_real_even_boxes_equals_the_centred_route(D, d):
    """The half-transform crop (no centring shifts, Nyquist row and column made by hand) gives what
    cropping the centred full transform and taking the real part gives, on white noise, which fills the
    Nyquist row and column the two treat differently if at all."""
    from cryofastar_core.physics.fourier import _resample
    x = torch.randn(3, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(D + d))
    fast, centred = fourier_crop(x, d), _resample(x, d, 2)
    assert fast.shape == centred.shape == (3, d, d)
    assert torch.allclose(fast, centred, rtol=0, atol=1e-12 * float(centred.abs().max()))
    # odd boxes keep the centred route
    assert fourier_crop(x[:, :D - 1, :D - 1], d - 1).shape == (3, d - 1, d - 1)
