"""Projection of a volume by the Fourier-slice theorem (trilinear interpolation on a padded grid).

Internal convention (``geometry.py``): the image for rotation ``R`` is ``P(x, y) = sum_z V(R (x, y, z))``,
so its centred 2D transform at ``(kx, ky)`` is ``V_hat(R (kx, ky, 0))``.

Accuracy: the volume is zero-padded ``pad`` times (finer Fourier sampling) and pre-divided by the
transform of the trilinear kernel, ``sinc^2`` per axis ("gridding correction"), so that trilinear
interpolation of its transform is close to exact. At ``pad = 2`` the relative error against a cubic
real-space projection is small (bench/bench_physics.py; bench/results/2026-11-24-physics.md); the correction roughly halves it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryofastar_core.physics import compiled
from cryofastar_core.physics.fourier import fft3c, freq_1d, ifft2c, pad_centred


@dataclass
class VolumeFT:
    """A volume ready for projection.

    ``ft``: centred complex transform ``(Dp, Dp, Dp)`` of the zero-padded, gridding-pre-corrected
    volume, ``Dp = pad * box``, on the device projections will run on. ``box``: the original ``D``.
    """

    ft: Tensor
    box: int
    pad: int

    @property
    def padded_box(self) -> int:
        return self.ft.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.ft.device

    def to(self, device) -> "VolumeFT":
        return VolumeFT(self.ft.to(device), self.box, self.pad)


def gridding_kernel(box: int, padded_box: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Real-space transform of the trilinear kernel on a ``padded_box`` Fourier grid, sampled on the
    central ``box**3`` voxels: ``prod_axes sinc^2(x / padded_box)`` with ``x`` relative to the centre.

    Trilinear interpolation (or splatting) in Fourier space is a convolution with a triangle, i.e. a
    multiplication of the real-space map by this kernel; dividing by it undoes that attenuation.
    """
    x = (torch.arange(box, device=device, dtype=torch.float64) - box // 2) / padded_box
    s = torch.sinc(x) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(dtype)


def prepare_volume(volume: Tensor, pad: int = 2, gridding_correction: bool = True) -> VolumeFT:
    """``(D, D, D)`` real volume -> :class:`VolumeFT` (zero-pad, sinc^2 pre-correction, centred FFT)."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"prepare_volume expects a cubic (D, D, D) volume, got {tuple(volume.shape)}")
    if pad < 1:
        raise ValueError("pad must be >= 1")
    D = volume.shape[-1]
    Dp = D * pad
    vol = volume.to(torch.float32) if not volume.is_floating_point() else volume
    if gridding_correction:
        vol = vol / gridding_kernel(D, Dp, device=vol.device, dtype=vol.dtype)
    ft = fft3c(pad_centred(vol, Dp, 3))
    return VolumeFT(ft=ft, box=D, pad=pad)


def slice_coordinates(rotations: Tensor, box: int, scale: float) -> Tensor:
    """Central-slice sample positions ``(B, D, D, 3)`` = ``R (kx, ky, 0) * scale``, ordered ``(x, y, z)``.

    ``kx, ky`` are in cycles/px of a ``box`` image; ``scale`` converts to grid units (the padded box size).
    """
    k = freq_1d(box, device=rotations.device, dtype=rotations.dtype) * scale
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return _rotated_plane(rotations, kx, ky)


def _rotated_plane(rotations: Tensor, kx: Tensor, ky: Tensor) -> Tensor:
    """``R (kx, ky, 0)`` ``(B, *S, 3)`` for rotations ``(B, 3, 3)`` and in-plane positions ``kx``, ``ky`` of any
    shape ``S``: ``kx * R[:, :, 0] + ky * R[:, :, 1]``."""
    axes = (rotations.shape[0],) + (1,) * kx.ndim + (3,)
    return kx[None, ..., None] * rotations[:, :, 0].reshape(axes) + ky[None, ..., None] * rotations[:, :, 1].reshape(axes)


def trilinear_corners(coords: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Flat indices ``(8, M)`` and weights ``(8, M)`` of the 8 trilinear neighbours on a centred ``n**3`` grid.

    ``coords`` ``(M, 3)`` are ``(x, y, z)`` offsets from the centre in grid units; the grid array is
    indexed ``[z, y, x]``. Neighbours outside the grid get weight 0 (and a clamped, valid index).
    """
    g = coords + n // 2
    g0 = torch.floor(g)
    f = g - g0
    g0 = g0.long()
    idx, wts = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                ix, iy, iz = g0[:, 0] + dx, g0[:, 1] + dy, g0[:, 2] + dz
                w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1]) * (f[:, 2] if dz else 1 - f[:, 2])
                inside = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
                w = torch.where(inside, w, torch.zeros_like(w))
                flat = (iz.clamp(0, n - 1) * n + iy.clamp(0, n - 1)) * n + ix.clamp(0, n - 1)
                idx.append(flat)
                wts.append(w)
    return torch.stack(idx), torch.stack(wts)


def project_ft(vft: VolumeFT, rotations: Tensor) -> Tensor:
    """Centred 2D transforms ``(B, D, D)`` complex of the projections for rotations ``(B, 3, 3)``.

    Samples the padded volume transform at ``R (kx, ky, 0)`` with trilinear interpolation
    (``grid_sample`` on the interleaved real/imaginary view of ``ft``: no copy, and about 4x faster on
    CPU than gathering the 8 neighbours; the weights are those of ``trilinear_corners``, whose scatter
    form is the back-projection). Samples outside the padded grid are 0.
    """
    rotations = rotations.to(device=vft.ft.device, dtype=vft.ft.real.dtype)
    if rotations.ndim == 2:
        rotations = rotations[None]
    return sample_ft(vft, slice_coordinates(rotations, vft.box, float(vft.padded_box)))


def project_at(vft: VolumeFT, rotations: Tensor, index: Tensor) -> Tensor:
    """The projections' transforms at a subset of the ``(D, D)`` grid only: complex ``(B, P)`` for rotations
    ``(B, 3, 3)`` and flat grid positions ``index`` ``(P,)`` (``row * D + column`` of the centred grid).

    Each sample is the value :func:`project_ft` gives there (same coordinates, same interpolation), at
    ``P / D^2`` of its cost: matching needs only a band of the half plane (``refine/matching.py``)."""
    rotations = rotations.to(device=vft.ft.device, dtype=vft.ft.real.dtype)
    k = freq_1d(vft.box, device=rotations.device, dtype=rotations.dtype) * float(vft.padded_box)
    index = index.to(rotations.device)
    kx, ky = k[index % vft.box], k[index // vft.box]
    if compiled.usable_for(vft.ft, rotations):
        return compiled.sample_slices(vft.ft, rotations, kx, ky)
    return sample_ft(vft, _rotated_plane(rotations, kx, ky)[:, None])[:, 0]


def sample_ft(vft: VolumeFT, coords: Tensor) -> Tensor:
    """The padded transform at ``coords`` ``(B, H, W, 3)`` (``(x, y, z)`` offsets from the centre in units of
    the padded grid), trilinear: complex ``(B, H, W)``; 0 outside the grid.

    ``grid_sample`` on the interleaved real/imaginary view of ``ft``: no copy, and about 4x faster on CPU than
    gathering the 8 neighbours; the weights are those of ``trilinear_corners``. On the CPU ``grid_sample``
    shares its work among threads by batch item only, so the samples are split into one batch item per
    thread over the same (expanded, not copied) volume: 2.5x faster on 2 threads, the same values.
    """
    Dp = vft.padded_box
    grid = coords.to(vft.ft.real.dtype) * (2.0 / (Dp - 1)) + (2.0 * (Dp // 2) / (Dp - 1) - 1.0)
    B, H, W = grid.shape[:3]
    parts = min(B, torch.get_num_threads()) if grid.device.type == "cpu" and B > 1 else 1
    per = -(-B // parts)
    if per * parts > B:  # padded with the origin's coordinates, dropped below
        grid = torch.cat([grid, grid.new_zeros((per * parts - B, H, W, 3))])
    channels = torch.view_as_real(vft.ft).permute(3, 0, 1, 2)[None]       # (1, 2, Dp, Dp, Dp) view
    out = torch.nn.functional.grid_sample(channels.expand(parts, -1, -1, -1, -1), grid.reshape(parts, per, H, W, 3),
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    return torch.complex(out[:, 0], out[:, 1]).reshape(per * parts, H, W)[:B]  # out: (parts, 2, per, H, W)


def project(volume_or_vft: Tensor | VolumeFT, rotations: Tensor, pad: int = 2) -> Tensor:
    """Real projections ``(B, D, D)`` of a volume ``(D, D, D)`` (or a prepared :class:`VolumeFT`)."""
    vft = volume_or_vft if isinstance(volume_or_vft, VolumeFT) else prepare_volume(volume_or_vft, pad=pad)
    return ifft2c(project_ft(vft, rotations)).real
