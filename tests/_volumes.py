"""Small test densities and particle sets for the refinement, registration and junk tests (densities written
by hand, not by the code under test)."""
from __future__ import annotations

import torch


def blob_volume(box: int, n_blobs: int = 12, seed: int = 0, centred: bool = False) -> torch.Tensor:
    """Asymmetric test density ``(box, box, box)``: Gaussian blobs of random size and weight; with ``centred``
    moved (periodically) so that its centre of mass is at the box centre."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(box, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box)
    for _ in range(n_blobs):
        p = (torch.rand(3, generator=g) * 2 - 1) * box * 0.22
        sigma = box * (0.03 + 0.04 * float(torch.rand(1, generator=g)))
        amp = 0.5 + float(torch.rand(1, generator=g))
        vol += amp * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma ** 2))
    if centred:  # centre of mass at the box centre, as the training volumes and simulated maps are
        k = torch.arange(box, dtype=torch.float64) - box // 2
        w = vol.double()
        com = torch.stack([(w * k[None, None, :]).sum(), (w * k[None, :, None]).sum(), (w * k[:, None, None]).sum()])
        com = com / w.sum()
        f = torch.fft.fftfreq(box, dtype=torch.float64)
        kz, ky, kx = torch.meshgrid(f, f, f, indexing="ij")
        ramp = torch.exp(2j * torch.pi * (kx * com[0] + ky * com[1] + kz * com[2]))  # out(p) = vol(p + com)
        vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.fftn(torch.fft.ifftshift(w)) * ramp)).real.float()
    return vol


def blob_particles(n: int, box: int, apix: float, g: torch.Generator, volume: torch.Tensor | None = None):
    """``n`` views of :func:`blob_volume` (or of ``volume``) at SNR 1 with CTF (defocus 0.4-1.0 um: at box 32 a larger one
    spreads the signal past the box) and shifts within 2 px, drawn from ``g``: ``(R (n, 3, 3) float64,
    s (n, 2) float64, ctf, images (n, box, box))``."""
    from cryofastar_core.geometry import random_rotations
    from cryofastar_core.physics.ctf import CTFParams
    from cryofastar_core.physics.projection import prepare_volume
    from cryofastar_core.simulation.images import simulate_images

    R = random_rotations(n, g, dtype=torch.float64)
    s = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 2
    dfu = 4000 + 6000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = CTFParams.from_arrays(dict(defocus_u=dfu, defocus_v=dfu - 300, defocus_angle=torch.rand(n, generator=g) * 180,
                                     voltage=300.0, cs=2.7, amplitude_contrast=0.1))
    vol = blob_volume(box) if volume is None else volume
    _, images = simulate_images(prepare_volume(vol), R.float(), s.float(), ctf, apix, snr=1.0,
                                generator=g)
    return R, s, ctf, images
