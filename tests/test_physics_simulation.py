"""simulate_images: project -> CTF -> shift -> inverse FT -> noise."""
from __future__ import annotations

import torch

from cryofastar_core.geometry import random_rotations
from cryofastar_core.physics.ctf import CTFParams, compute_ctf
from cryofastar_core.physics.fourier import fft2c, ifft2c
from cryofastar_core.physics.projection import prepare_volume, project
from cryofastar_core.physics.shift import shift_images
from cryofastar_core.simulation.images import simulate_images
from tests.conftest import make_asymmetric_map


def test_simulation_order_and_noise():
    vol = torch.from_numpy(make_asymmetric_map(33, seed=1))
    g = torch.Generator().manual_seed(0)
    n = 6
    R = random_rotations(n, g)
    shifts = torch.rand(n, 2, generator=g) * 6 - 3
    ctf = CTFParams.from_arrays({"defocus_u": torch.rand(n, generator=g) * 1e4 + 5e3,
                                 "defocus_v": torch.rand(n, generator=g) * 1e4 + 5e3,
                                 "defocus_angle": torch.rand(n, generator=g) * 180, "voltage": 300.0, "cs": 2.7,
                                 "amplitude_contrast": 0.1})
    vft = prepare_volume(vol)
    clean, noisy = simulate_images(vft, R, shifts, ctf, 3.0, snr=0.5, generator=torch.Generator().manual_seed(1))
    # independent composition: projection, CTF by FFT, then the shift (odd box: no unpaired Nyquist terms,
    # so taking the real part between steps is exact)
    proj = project(vft, R)
    expected = shift_images(ifft2c(fft2c(proj) * compute_ctf(ctf, 33, 3.0)).real, shifts)
    assert torch.allclose(clean, expected, atol=1e-4 * float(expected.abs().max()))
    snr = clean.var(dim=(-2, -1)) / (noisy - clean).var(dim=(-2, -1))
    assert torch.allclose(snr, torch.full((n,), 0.5), rtol=0.15)
    # no noise requested: noisy is a copy of clean
    c2, n2 = simulate_images(vft, R, None, None, 3.0, None)
    assert torch.equal(c2, n2) and torch.allclose(c2, proj, atol=1e-5)
