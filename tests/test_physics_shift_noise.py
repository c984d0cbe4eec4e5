"""Phase-ramp shifts (origin convention) and white noise at a given SNR."""
from __future__ import annotations

import torch

from cryofastar_core.physics.noise import add_noise
from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.physics.shift import phase_ramp, shift_images, shift_volume


def test_integer_shift_follows_the_origin_convention():
    """image(p) = centred(p + s): content moves by -s (RELION's rlnOrigin meaning)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    s = torch.tensor([[3.0, -2.0], [0.0, 5.0]], dtype=torch.float64)
    out = shift_images(img, s)
    for i in range(2):
        expected = torch.roll(img[i], shifts=(-int(s[i, 1]), -int(s[i, 0])), dims=(0, 1))
        assert torch.allclose(out[i], expected, atol=1e-10)


def test_subpixel_shift_roundtrip_and_ramp_properties():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(3, 20, 20, generator=g, dtype=torch.float64)
    s = torch.rand(3, 2, generator=g, dtype=torch.float64) * 4 - 2
    # undoing with -s restores (the odd box keeps every frequency's partner; even boxes lose Nyquist symmetry)
    img = torch.randn(3, 21, 21, generator=g, dtype=torch.float64)
    assert torch.allclose(shift_images(shift_images(img, s), -s), img, atol=1e-10)
    ramp = phase_ramp(8, s)
    assert ramp.shape == (3, 8, 8) and torch.allclose(ramp.abs(), torch.ones(3, 8, 8, dtype=torch.float64))
    assert torch.allclose(ramp[:, 4, 4], torch.ones(3, dtype=torch.complex128))


def test_shift_volume_moves_content_by_t_and_centres_a_map():
    vol = torch.zeros(16, 16, 16)
    vol[5, 7, 9] = 1.0  # V[z, y, x]: the point (x, y, z) = (1, -1, -3) about the centre 8
    moved = shift_volume(vol, torch.tensor([2.0, -1.0, 3.0]))  # out(w) = vol(w - t): the point moves by +t
    assert moved.argmax() == (8 * 16 + 6) * 16 + 11 and float(moved.max()) > 0.999
    torch.testing.assert_close(volume_centroid(moved), torch.tensor([3.0, -2.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    slab = torch.exp(-((torch.arange(32.0) - 16.0) ** 2)[:, None, None] / 8) * torch.ones(1, 32, 32)
    dz = volume_centroid(shift_volume(slab, torch.tensor([0.0, 0.0, 1.37])))[2] - volume_centroid(slab)[2]
    assert abs(float(dz) - 1.37) < 0.02  # sub-pixel


def test_add_noise_hits_the_snr_and_is_reproducible():
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(4, 64, 64, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None, None]
    snr = torch.tensor([10.0, 1.0, 0.1, 0.5])
    noisy = add_noise(clean, snr, generator=torch.Generator().manual_seed(5))
    measured = clean.var(dim=(-2, -1)) / (noisy - clean).var(dim=(-2, -1))
    assert torch.allclose(measured, snr, rtol=0.08)
    again = add_noise(clean, snr, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)
    scalar = add_noise(clean, 2.0, generator=torch.Generator().manual_seed(5))
    assert scalar.shape == clean.shape
