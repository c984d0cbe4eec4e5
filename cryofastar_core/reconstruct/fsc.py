"""Fourier shell correlation and the resolution at a threshold."""
from __future__ import annotations

import math

import torch
from torch import Tensor



def fsc(vol1: Tensor, vol2: Tensor) -> tuple[Tensor, Tensor]:
    """FSC of two ``(D, D, D)`` volumes.

    Shells are 1 Fourier voxel thick (``round(|k| D)``), from 0 to ``D // 2`` (Nyquist).
    Returns ``(freq, fsc)``, each ``(D // 2 + 1,)``: ``freq`` in cycles/px (``i / D``), computed in float64.

    From the half transforms (``rfftn``; a sample at ``kx > 0`` stands for its Friedel partner too, counted
    twice), without centring (no shell sum depends on the phase), a ``kz`` plane at a time: at box 256 the
    temporaries are two half transforms, not a dozen full-grid arrays (tests/test_reconstruct_fsc_mask.py holds
    the full-grid definition).
    """
    if vol1.shape != vol2.shape or vol1.ndim != 3:
        raise ValueError(f"fsc needs two volumes of the same (D, D, D) shape, got {tuple(vol1.shape)} and {tuple(vol2.shape)}")
    D, dev = vol1.shape[-1], vol1.device
    f1 = torch.fft.rfftn(vol1.to(torch.float64))
    f2 = torch.fft.rfftn(vol2.to(device=dev, dtype=torch.float64))
    n, hx = D // 2 + 1, f1.shape[-1]
    k2 = torch.fft.fftfreq(D, 1.0 / D, device=dev, dtype=torch.float32) ** 2     # integer squares: exact
    yx2 = k2[:, None] + (torch.arange(hx, device=dev, dtype=torch.float32) ** 2)[None, :]
    twice = torch.full((hx,), 2.0, dtype=torch.float64, device=dev)
    twice[0] = 1.0
    if D % 2 == 0:
        twice[-1] = 1.0                    # kx = D/2: one column of the full grid, not a pair
    sums = torch.zeros(3, n, dtype=torch.float64, device=dev)
    for z in range(D):
        shell = torch.round(torch.sqrt(yx2 + k2[z])).long().reshape(-1)   # as radial_index_grid (float32)
        keep = shell < n
        a, b = f1[z], f2[z]
        terms = torch.stack([(a * b.conj()).real, a.real ** 2 + a.imag ** 2, b.real ** 2 + b.imag ** 2]) * twice
        sums.index_add_(1, shell[keep], terms.reshape(3, -1)[:, keep])
    num, den = sums[0], torch.sqrt(sums[1] * sums[2])
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    freq = torch.arange(n, dtype=torch.float64, device=dev) / D
    return freq, curve


def resolution_at(freq: Tensor, fsc_curve: Tensor, apix: float, threshold: float) -> float:
    """Resolution in Å where the FSC first drops below ``threshold`` (linear interpolation between shells).

    The DC shell is skipped. Returns Nyquist (``2 * apix``) if the curve never drops below.
    """
    f = freq.detach().double().cpu()
    c = fsc_curve.detach().double().cpu()
    below = torch.nonzero(c[1:] < threshold).flatten()
    if below.numel() == 0:
        return 2.0 * apix
    i = int(below[0]) + 1
    c0, c1, f0, f1 = float(c[i - 1]), float(c[i]), float(f[i - 1]), float(f[i])
    t = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
    fc = f0 + t * (f1 - f0)
    return apix / fc if fc > 0 else math.inf


def _floats(x) -> list[float]:
    return [float(v) for v in (x.detach().cpu().flatten() if isinstance(x, Tensor) else x)]


def fsc_tsv(freq, fsc_curve, apix: float) -> str:
    """The one ``fsc.tsv`` format (``cryofastar run`` and ``cryofastar reconstruct`` alike) for ``freq``
    ``(S,)`` cycles/px and ``fsc_curve`` ``(S,)``: tab-separated columns ``shell``,
    ``frequency_1_per_A``, ``resolution_A`` (inf at DC), ``fsc``."""
    lines = ["shell\tfrequency_1_per_A\tresolution_A\tfsc"]
    for i, (f, c) in enumerate(zip(_floats(freq), _floats(fsc_curve))):
        fa = f / apix
        res = "inf" if fa <= 0 else f"{1.0 / fa:.4f}"
        lines.append(f"{i}\t{fa:.6f}\t{res}\t{c:.6f}")
    return "\n".join(lines) + "\n"
