"""Centred Fourier transforms, frequency grids and Fourier cropping / padding.

Convention: "centred" means the origin sits at index ``n // 2`` in both real and Fourier space
(fftshift convention), so frequency index ``i`` is ``k = (i - n // 2) / n`` cycles/px. Transforms are
unnormalised in the forward direction (numpy's "backward" norm): the DC term is the sum of the pixels,
which makes the Fourier-slice theorem hold without extra factors (the 2D transform of a sum over z is
the central slice of the 3D transform).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _fftn_c(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def _ifftn_c(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def fft2c(x: Tensor) -> Tensor:
    """``(..., D, D)`` real or complex -> centred complex 2D transform ``(..., D, D)`` (DC at ``D // 2``)."""
    return _fftn_c(x, (-2, -1))


def ifft2c(x: Tensor) -> Tensor:
    """Inverse of :func:`fft2c`; returns complex (take ``.real`` for images)."""
    return _ifftn_c(x, (-2, -1))


def fft3c(x: Tensor) -> Tensor:
    """``(..., D, D, D)`` -> centred complex 3D transform."""
    return _fftn_c(x, (-3, -2, -1))


def ifft3c(x: Tensor) -> Tensor:
    """Inverse of :func:`fft3c`; returns complex."""
    return _ifftn_c(x, (-3, -2, -1))


def freq_1d(n: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Centred frequencies ``(n,)`` in cycles/px: ``(i - n // 2) / n``."""
    return (torch.arange(n, device=device, dtype=dtype) - n // 2) / n


def freq_grid_2d(box: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Centred 2D frequency grid ``(D, D, 2)`` holding ``(kx, ky)`` in cycles/px; indexed ``[y, x]``."""
    k = freq_1d(box, device=device, dtype=dtype)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx, ky], dim=-1)


def radial_index_grid(box: int, ndim: int, device=None) -> Tensor:
    """Integer Fourier shell index ``round(|k| * box)`` on a centred ``box**ndim`` grid."""
    k = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    grids = torch.meshgrid(*([k] * ndim), indexing="ij")
    r = torch.sqrt(sum(g * g for g in grids))
    return torch.round(r).long()


def _crop_or_pad_centred(ft: Tensor, new: int, ndim: int) -> Tensor:
    """Crop or zero-pad the last ``ndim`` axes of a centred array around index ``n // 2``."""
    old = ft.shape[-1]
    if new == old:
        return ft
    if new < old:
        start = old // 2 - new // 2
        sl = (Ellipsis,) + (slice(start, start + new),) * ndim
        return ft[sl]
    out = ft.new_zeros(ft.shape[:-ndim] + (new,) * ndim)
    start = new // 2 - old // 2
    sl = (Ellipsis,) + (slice(start, start + old),) * ndim
    out[sl] = ft
    return out


def _resample(x: Tensor, new_box: int, ndim: int) -> Tensor:
    old = x.shape[-1]
    if any(s != old for s in x.shape[-ndim:]):
        raise ValueError(f"expected square/cubic last {ndim} axes, got {tuple(x.shape)}")
    if new_box == old:
        return x.clone()
    dims = tuple(range(-ndim, 0))
    ft = _fftn_c(x, dims)
    ft = _crop_or_pad_centred(ft, new_box, ndim)
    out = _ifftn_c(ft, dims).real
    # Unnormalised forward FFT: DC = mean * old**ndim, inverse divides by new**ndim; this factor keeps
    # pixel values (and the mean) unchanged, so a smooth image looks the same at any box.
    return out * (new_box / old) ** ndim


def fourier_crop(images: Tensor, new_box: int) -> Tensor:
    """Downsample ``(..., D, D)`` real images to ``(..., d, d)`` by cropping their centred transform.

    Scaling: pixel values are preserved (the image mean is unchanged; a band-limited image is
    resampled exactly). The pixel size grows by ``D / d``. The transform's Nyquist row/column of the
    cropped grid is kept as is and the real part taken.
    """
    if new_box > images.shape[-1]:
        raise ValueError(f"fourier_crop: new_box {new_box} > box {images.shape[-1]}; use fourier_pad")
    if not images.is_complex() and images.shape[-1] % 2 == 0 and new_box % 2 == 0 and new_box < images.shape[-1] \
            and images.shape[-2] == images.shape[-1]:
        return _crop_real_even(images, new_box)
    return _resample(images, new_box, 2)


def _crop_real_even(images: Tensor, d: int) -> Tensor:
    """:func:`fourier_crop` of real images, even ``D`` to even ``d < D``, by half transforms (7x faster at
    256 -> 64, the refine stage's every read at scale; equal to the centred route to float precision,
    tests/test_physics_fourier.py).

    No centring shifts: for even boxes each is a factor ``(-1)^(kx + ky)`` on the kept frequencies, and
    the input's and the output's cancel. What the centred route's "real part" does to the kept Nyquist
    row and column is done by hand: its row ``ky = -d/2`` becomes the mean of the input's ``ky = -d/2``
    and ``+d/2`` rows (the Nyquist column ``kx = d/2`` gets the same from ``irfft2`` itself), except at
    ``kx = d/2``, where it is the input's ``(d/2, d/2)`` sample.
    """
    D, h = images.shape[-1], d // 2
    f = torch.fft.rfft2(images)
    half = torch.cat([f[..., :h, :h + 1], f[..., D - h:, :h + 1]], dim=-2)
    half[..., h, :] = (f[..., D - h, :h + 1] + f[..., h, :h + 1]) / 2
    half[..., h, h] = f[..., h, h]
    return torch.fft.irfft2(half, s=(d, d)) * (d / D) ** 2


def fourier_pad(images: Tensor, new_box: int) -> Tensor:
    """Upsample ``(..., d, d)`` real images to ``(..., D, D)`` by zero-padding their transform (values preserved)."""
    if new_box < images.shape[-1]:
        raise ValueError(f"fourier_pad: new_box {new_box} < box {images.shape[-1]}; use fourier_crop")
    return _resample(images, new_box, 2)


def fourier_crop_volume(vol: Tensor, new_box: int) -> Tensor:
    """Downsample ``(..., D, D, D)`` volumes to ``(..., d, d, d)`` (voxel values preserved, as :func:`fourier_crop`)."""
    if new_box > vol.shape[-1]:
        raise ValueError(f"fourier_crop_volume: new_box {new_box} > box {vol.shape[-1]}")
    return _resample(vol, new_box, 3)


def fourier_pad_volume(vol: Tensor, new_box: int) -> Tensor:
    """Upsample ``(..., d, d, d)`` volumes to ``(..., D, D, D)`` (voxel values preserved)."""
    if new_box < vol.shape[-1]:
        raise ValueError(f"fourier_pad_volume: new_box {new_box} < box {vol.shape[-1]}")
    return _resample(vol, new_box, 3)


def pad_centred(x: Tensor, new: int, ndim: int) -> Tensor:
    """Zero-pad (or crop) the last ``ndim`` axes of a real-space array, keeping the centre at ``n // 2``."""
    return _crop_or_pad_centred(x, new, ndim)


def filter_half_spectrum(volume: Tensor, factor: Callable[[int, Tensor], Tensor]) -> Tensor:
    """A real volume ``(D, D, D)`` (``V[z, y, x]``) times a separable Fourier filter, one axis at a time on the
    half spectrum: axis ``a`` (0: z, 1: y, 2: x) multiplied by ``factor(a, k)``, ``k`` ``(n_a,)`` float64 in
    cycles/px along it (``rfftfreq`` along x). Float32 volumes stay in single precision (a box-256 map is
    filtered in a few hundred MB)."""
    d = volume.shape[-1]
    real = torch.float64 if volume.dtype == torch.float64 else torch.float32
    spec = torch.fft.rfftn(volume.to(real), dim=(-3, -2, -1))
    for axis, k in ((0, torch.fft.fftfreq(d, dtype=torch.float64)), (1, torch.fft.fftfreq(d, dtype=torch.float64)),
                    (2, torch.fft.rfftfreq(d, dtype=torch.float64))):
        f = factor(axis, k)
        f = f.to(device=volume.device, dtype=spec.dtype if f.is_complex() else real)
        spec *= f.reshape([-1 if a == axis else 1 for a in range(3)])
    return torch.fft.irfftn(spec, s=volume.shape[-3:], dim=(-3, -2, -1)).to(volume.dtype)


def lowpass_volume(volume: Tensor, sigma: float) -> Tensor:
    """A real volume ``(D, D, D)`` times a Gaussian of width ``sigma`` cycles/px in Fourier space."""
    return filter_half_spectrum(volume, lambda axis, k: torch.exp(-k ** 2 / (2 * sigma ** 2)))
