"""compute_ctf: sign, astigmatism direction, envelope, scale (RELION agreement is in test_physics_relion.py)."""
from __future__ import annotations

import torch

from cryofastar_core.physics.ctf import CTFParams, compute_ctf, ctf_at_frequencies, electron_wavelength


def _params(**over):
    base = dict(defocus_u=[15000.0], defocus_v=[15000.0], defocus_angle=[0.0], voltage=300.0, cs=2.7,
                amplitude_contrast=0.1)
    base.update(over)
    return CTFParams.from_arrays({k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
                                  for k, v in base.items()}, dtype=torch.float64)


def test_wavelength_300kv():
    assert abs(float(electron_wavelength(torch.tensor(300.0, dtype=torch.float64))) - 0.019687) < 1e-5


def test_sign_at_low_frequency_and_dc():
    D = 64
    c = compute_ctf(_params(), D, 1.0)
    assert c.shape == (1, D, D)
    # DC: -sin(-w) = sin(atan(Q / sqrt(1 - Q^2))) = Q  (positive for underfocus with amplitude contrast)
    assert abs(float(c[0, D // 2, D // 2]) - 0.1) < 1e-9
    assert float(c[0, D // 2, D // 2 + 1]) > 0.1


def test_astigmatism_angle_zero_puts_u_along_x():
    """With U > V and angle 0, the first zero comes earlier along x (columns) than along y (rows)."""
    D = 256
    c = compute_ctf(_params(defocus_u=[25000.0], defocus_v=[10000.0]), D, 1.0)[0]
    along_x = c[D // 2, D // 2:]
    along_y = c[D // 2:, D // 2]
    first_zero = lambda prof: int(torch.nonzero(prof < 0)[0])
    assert first_zero(along_x) < first_zero(along_y)
    # angle 90 swaps the axes
    c90 = compute_ctf(_params(defocus_u=[25000.0], defocus_v=[10000.0], defocus_angle=[90.0]), D, 1.0)[0]
    assert torch.allclose(c90, c.T, atol=1e-9)


def test_bfactor_scale_phase_shift_and_batching():
    D = 32
    k = torch.arange(D, dtype=torch.float64) - D // 2
    k2 = (k[:, None] ** 2 + k[None, :] ** 2) / (D * 2.0) ** 2
    ref = compute_ctf(_params(), D, 2.0)
    damped = compute_ctf(_params(bfactor=[100.0], scale=[0.5]), D, 2.0)
    assert torch.allclose(damped, ref * 0.5 * torch.exp(-100.0 * k2 / 4))
    # a 90 degree phase plate turns -sin(chi) into cos(chi) at DC: value sqrt(1 - Q^2)
    pp = compute_ctf(_params(phase_shift=[90.0]), D, 2.0)
    assert abs(float(pp[0, D // 2, D // 2]) - (1 - 0.01) ** 0.5) < 1e-9
    # batch of two with per-particle pixel sizes equals two single calls
    two = CTFParams.from_arrays({"defocus_u": torch.tensor([15000.0, 9000.0]), "defocus_v": torch.tensor([14000.0, 8000.0]),
                                 "defocus_angle": torch.tensor([10.0, 70.0]), "voltage": 300.0, "cs": 2.7,
                                 "amplitude_contrast": 0.1}, dtype=torch.float64)
    both = compute_ctf(two, D, torch.tensor([1.0, 2.5]))
    assert torch.allclose(both[1:], compute_ctf(two.index(slice(1, 2)), D, 2.5))
    # ctf_at_frequencies is the same function at arbitrary points
    kk = (torch.arange(D, dtype=torch.float64) - D // 2) / D
    ky, kx = torch.meshgrid(kk, kk, indexing="ij")
    assert torch.allclose(ctf_at_frequencies(two, kx[None] / 1.0, ky[None] / 1.0)[0], both[0])


def test_phase_flip_leaves_the_ctf_amplitude_only():
    """Phase flipping a CTF-modulated image gives the unmodulated image filtered by |CTF|, and the
    inference path applies it at the particles' own box and pixel size."""
    from cryofastar_core.inference.preprocess import correct_ctf, to_model_input
    from cryofastar_core.physics.ctf import phase_flip
    from cryofastar_core.physics.fourier import fft2c, ifft2c

    g = torch.Generator().manual_seed(0)
    box, apix = 32, 2.5
    # Without Nyquist content: the unpaired Nyquist row and column of an even box make the real part of
    # any filtering there non-invertible, on both sides of the comparison.
    spectrum = fft2c(torch.randn(3, box, box, generator=g, dtype=torch.float64))
    spectrum[:, 0, :] = 0
    spectrum[:, :, 0] = 0
    image = ifft2c(spectrum).real
    p = _params(defocus_u=[9000.0, 15000.0, 22000.0], defocus_v=[8500.0, 14000.0, 21500.0],
                defocus_angle=[10.0, 70.0, 130.0])
    ctf = compute_ctf(p, box, apix)
    modulated = ifft2c(fft2c(image) * ctf).real
    expected = ifft2c(fft2c(image) * ctf.abs()).real
    torch.testing.assert_close(phase_flip(modulated, p, apix), expected, atol=1e-10, rtol=0)
    assert (ctf < 0).float().mean() > 0.2  # the check is not trivial: many components flip
    torch.testing.assert_close(correct_ctf(modulated, p, apix, "none"), modulated)
    torch.testing.assert_close(correct_ctf(modulated, None, apix, "phase_flip"), modulated)
    direct = to_model_input(modulated.float(), box, ctf=p, apix=apix, ctf_correction="phase_flip")
    via = to_model_input(expected.float(), box)
    torch.testing.assert_close(direct, via, atol=1e-4, rtol=0)
