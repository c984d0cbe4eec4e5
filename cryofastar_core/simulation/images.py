"""On-the-fly simulation of particle images (training data and tests).

Order of operations: project (Fourier slice) -> CTF -> shift (phase ramp) -> inverse FT -> noise. All in
Fourier space until the inverse transform, on the volume's device. ``tests/test_relion_conventions.py``
checks the noiseless images against ``relion_project`` of the same STAR.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryofastar_core.physics.ctf import CTFParams, compute_ctf
from cryofastar_core.physics.fourier import ifft2c
from cryofastar_core.physics.noise import add_noise
from cryofastar_core.physics.projection import VolumeFT, project_ft
from cryofastar_core.physics.shift import phase_ramp


def simulate_images(vft: VolumeFT, rotations: Tensor, shifts: Tensor | None = None, ctf: CTFParams | None = None,
                    apix: float | Tensor = 1.0, snr: float | Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Simulate ``B`` images of box ``D = vft.box``.

    rotations ``(B, 3, 3)`` (internal convention), shifts ``(B, 2)`` px or None, ctf per particle or None,
    apix Å/px (float or ``(B,)``; only used by the CTF), snr float / ``(B,)`` or None (no noise).
    Returns ``(clean, noisy)``, each ``(B, D, D)`` real on ``vft``'s device; ``clean`` has the CTF and the
    shift but no noise; without ``snr`` ``noisy`` is a copy of ``clean``.
    """
    dev = vft.ft.device
    rotations = rotations.to(dev)
    ft = project_ft(vft, rotations)
    D = vft.box
    if ctf is not None:
        apix_t = apix.to(dev) if torch.is_tensor(apix) else apix
        ft = ft * compute_ctf(ctf.to(dev), D, apix_t).to(ft.real.dtype)
    if shifts is not None:
        ft = ft * phase_ramp(D, shifts.to(device=dev, dtype=ft.real.dtype))
    clean = ifft2c(ft).real
    if snr is None:
        return clean, clean.clone()
    snr_t = snr.to(dev) if torch.is_tensor(snr) else snr
    return clean, add_noise(clean, snr_t, generator=generator)
