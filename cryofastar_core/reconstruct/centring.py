"""Where a map's frame has its origin: the offset that puts the molecule's centre of mass at the box centre.

An ab initio map's origin is as free as its orientation; the job fixes it at the centre of mass, where
the feed-forward centroids (:mod:`cryofastar_core.physics.centre`) and simulated maps put it. The estimate
must not be pulled by what is not molecule: the noise and ringing of a reconstruction, clamped to their
positive parts, pull a plain centroid by up to half a pixel (towards the grid's ``-0.5`` px mean on an even
box), and a mask that cuts the particle pulls it by as much; so the map is low-passed and the mask is the
box's inscribed sphere (tests/test_reconstruct_centring.py has both cases).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.physics.fourier import lowpass_volume
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.reconstruct.mask import soft_sphere_mask

CENTRING_LOWPASS = 1 / 8  # cycles/px: a Gaussian of a quarter of Nyquist, at any box
CENTRING_EDGE = 2.0  # px: the soft edge of the inscribed sphere


def centring_offset(volume: Tensor, settle: int = 3) -> Tensor:
    """``t`` ``(3,)`` px (float64) such that ``shift_volume(volume, t)`` has its centre of mass at the box
    centre ``D // 2``: the centroid of the volume's positive density low-passed by
    :data:`CENTRING_LOWPASS`, inside the box's inscribed sphere, settled ``settle`` times (the fixed
    sphere sees a moved map a little differently)."""
    d = volume.shape[-1]
    smooth = lowpass_volume(volume.to(torch.float64), CENTRING_LOWPASS)
    sphere = soft_sphere_mask(d, d / 2 - CENTRING_EDGE, CENTRING_EDGE, device=volume.device, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64, device=volume.device)
    for _ in range(settle):
        t = t - volume_centroid(shift_volume(smooth, t), sphere)
    return t
