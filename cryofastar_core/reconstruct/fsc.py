"""Fourier shell correlation and the resolution at a threshold."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cryofastar_core.physics.fourier import fft3c, radial_index_grid


def fsc(vol1: Tensor, vol2: Tensor) -> tuple[Tensor, Tensor]:
    """FSC of two ``(D, D, D)`` volumes.

    Shells are 1 Fourier voxel thick (``round(|k| D)``), from 0 to ``D // 2`` (Nyquist).
    Returns ``(freq, fsc)``, each ``(D // 2 + 1,)``: ``freq`` in cycles/px (``i / D``), computed in float64.
    """
    if vol1.shape != vol2.shape or vol1.ndim != 3:
        raise ValueError(f"fsc needs two volumes of the same (D, D, D) shape, got {tuple(vol1.shape)} and {tuple(vol2.shape)}")
    D = vol1.shape[-1]
    f1 = fft3c(vol1.to(torch.float64))
    f2 = fft3c(vol2.to(torch.float64, device=vol1.device) if vol2.device != vol1.device else vol2.to(torch.float64))
    n = D // 2 + 1
    shell = radial_index_grid(D, 3, device=vol1.device).reshape(-1)
    keep = shell < n
    shell = shell[keep]
    cross = (f1 * f2.conj()).real.reshape(-1)[keep]
    p1 = (f1.abs() ** 2).reshape(-1)[keep]
    p2 = (f2.abs() ** 2).reshape(-1)[keep]
    z = torch.zeros(n, dtype=torch.float64, device=vol1.device)
    num = z.index_add(0, shell, cross)
    den = torch.sqrt(z.index_add(0, shell, p1) * z.index_add(0, shell, p2))
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    freq = torch.arange(n, dtype=torch.float64, device=vol1.device) / D
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
