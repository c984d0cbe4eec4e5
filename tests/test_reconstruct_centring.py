"""The frame's origin at the molecule's centre of mass (cryofastar_core/reconstruct/centring.py): a planted
offset is found, and neither a reconstruction's noise nor a mask that cuts the particle pulls the estimate
(both pull a plain centroid by tenths of a pixel)."""
from __future__ import annotations

import torch

from _volumes import blob_volume
from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.reconstruct import soft_sphere_mask
from cryofastar_core.reconstruct.centring import centring_offset


def test_a_planted_offset_is_found():
    vol = blob_volume(64, centred=True).double()
    t0 = torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)
    t = centring_offset(shift_volume(vol, t0))
    assert float((t + t0).norm()) < 0.06, t


def _reconstruction_noise(box: int, sd: float, seed: int) -> torch.Tensor:
    """Zero-mean noise whose amplitude grows with frequency, as a reconstruction's does (few images fill
    the outer shells)."""
    white = torch.randn(box, box, box, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k, kx = torch.fft.fftfreq(box, dtype=torch.float64), torch.fft.rfftfreq(box, dtype=torch.float64)
    radius = (k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2).sqrt()
    noise = torch.fft.irfftn(torch.fft.rfftn(white) * radius, s=(box, box, box))
    return noise * (sd / noise.std())


def test_noise_does_not_pull_the_origin():
    """Noise clamped to its positive part weighs every voxel alike: on an even box its plain centroid sits
    at -0.5 px on every axis, and pulls a plain estimate of a centred particle towards it."""
    vol = blob_volume(64, centred=True).double()
    noisy = vol + _reconstruction_noise(64, 0.5 * float(vol.max()), seed=0)
    assert float(volume_centroid(noisy).norm()) > 0.5  # the pull this estimate must not have
    assert float(centring_offset(noisy).norm()) < 0.2


def test_a_particle_reaching_the_mask_does_not_pull_the_origin():
    vol = blob_volume(48, centred=True).double()
    tight = volume_centroid(vol, soft_sphere_mask(48, 0.45 * 48 - 3, 3, dtype=torch.float64))
    assert float(tight.norm()) > 0.2  # refinement's mask cuts this particle
    assert float(centring_offset(vol).norm()) < 0.1
