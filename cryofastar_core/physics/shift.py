"""In-plane shifts as Fourier phase ramps.

Convention (``geometry.py``): a shift ``s = (sx, sy)`` in pixels has RELION's origin meaning,
``image(p) = centred_image(p + s)``; by the shift theorem ``F_img(k) = F_centred(k) * exp(+2 pi i k.s)``
with ``k`` in cycles/px. Multiplying by the conjugate ramp re-centres a particle.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryofastar_core.physics.fourier import fft2c, filter_half_spectrum, freq_1d, ifft2c


def phase_ramp(box: int, shifts: Tensor) -> Tensor:
    """``(B, D, D)`` complex ramps ``exp(+2 pi i (kx sx + ky sy))`` on the centred grid; shifts ``(B, 2)`` px.

    Multiplying a centred image transform by this APPLIES the shift (the particle moves by ``-s``).
    """
    shifts = torch.as_tensor(shifts)
    if not shifts.is_floating_point():
        shifts = shifts.float()
    k = freq_1d(box, device=shifts.device, dtype=shifts.dtype)
    phase = 2 * torch.pi * (k[None, None, :] * shifts[:, 0, None, None] + k[None, :, None] * shifts[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Apply shifts ``(B, 2)`` (px, origin convention) to real images ``(B, D, D)`` by Fourier phase ramp.

    The shift is periodic (content leaving one edge re-enters at the other), as in RELION
    (``tests/test_physics_relion.py`` compares it with ``relion_project --xoff/--yoff``).
    """
    ramp = phase_ramp(images.shape[-1], shifts.to(device=images.device, dtype=images.dtype))
    return ifft2c(fft2c(images) * ramp).real


def shift_volume(volume: Tensor, t: Tensor) -> Tensor:
    """A real volume ``(D, D, D)`` (``V[z, y, x]``) moved by ``t = (tx, ty, tz)`` px: ``out(w) = vol(w - t)``,
    by Fourier phase ramp (periodic), one axis at a time on the half spectrum
    (:func:`~cryofastar_core.physics.fourier.filter_half_spectrum`). A particle's shift follows a map moved
    by ``t`` as :meth:`cryofastar_core.refine.map_registration.Registration.shifts_for` says."""
    d = volume.shape[-1]
    t = torch.as_tensor(t, dtype=torch.float64).cpu()

    def ramp(axis: int, k: Tensor) -> Tensor:
        tk = t[2 - axis]  # axis 0 is z
        out = torch.polar(torch.ones_like(k), -2 * torch.pi * k * tk)
        if d % 2 == 0:  # the Nyquist term is its own mirror: its real ramp keeps the moved volume real
            out[d // 2] = torch.cos(torch.pi * tk)
        return out

    return filter_half_spectrum(volume, ramp)
