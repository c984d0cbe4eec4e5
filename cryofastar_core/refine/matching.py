"""The matched filter shared by local refinement, the global search and the pose-quality check.

A particle's transform ``X`` is compared with a projection ``P`` of a half map on a band of Fourier
samples (half plane, ``1 <= |q| <= r_lim`` in shells of the input box; DC carries only the background
level and Friedel symmetry makes the other half plane redundant), CTF-modulated and noise-whitened:
``score = Re sum_k conj(f c P) X e^{-2 pi i k.s} / N  /  sqrt(sum_k |f c P|^2 / N)`` (``c`` the CTF, ``f``
an optional per-shell weight, ``N`` the images' radially averaged power; see :mod:`cryofastar_core.refine.driver`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cryofastar_core.physics.ctf import CTFParams, ctf_at_frequencies
from cryofastar_core.physics.projection import project_at


class FourierBand:
    """The Fourier samples used in matching: half plane, ``1 <= |q| <= r_lim`` (q in input-box shells)."""

    def __init__(self, box: int, r_lim: float, device: torch.device):
        self.box = box
        self.crop = min(box, 2 * (int(math.ceil(r_lim)) + 2))
        d = self.crop
        q = torch.arange(d, device=device) - d // 2
        qy, qx = torch.meshgrid(q, q, indexing="ij")
        r2 = qx * qx + qy * qy
        keep = ((qy > 0) | ((qy == 0) & (qx > 0))) & (r2 <= r_lim * r_lim)
        self.qx, self.qy = qx[keep], qy[keep]
        self.idx_crop = ((self.qy + d // 2) * d + self.qx + d // 2)          # into the (d, d) projection
        self.idx_full = ((self.qy + box // 2) * box + self.qx + box // 2)    # into the (D, D) image transform
        self.shell = torch.round(torch.sqrt(r2[keep].double())).long()
        self.kx = self.qx.double() / box  # cycles per input pixel
        self.ky = self.qy.double() / box

    def ramps(self, shifts: Tensor, dtype: torch.dtype) -> Tensor:
        """``exp(-2 pi i k.s)`` ``(..., P)`` for shifts ``(..., 2)`` px: multiplying UNDOES the shift."""
        s = shifts.to(device=self.kx.device, dtype=torch.float64)
        phase = -2 * torch.pi * (s[..., 0:1] * self.kx + s[..., 1:2] * self.ky)
        return torch.polar(torch.ones_like(phase), phase).to(_complex(dtype))


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class PowerSpectrum:
    """Radially averaged power of image transforms at the input box (sum and count per shell)."""

    def __init__(self, box: int, device: torch.device):
        q = torch.arange(box, device=device) - box // 2
        r = torch.sqrt((q[:, None] ** 2 + q[None, :] ** 2).double())
        self.shell = torch.round(r).long().reshape(-1)
        n = int(self.shell.max()) + 1
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, ft: Tensor) -> None:
        p = (ft.abs() ** 2).reshape(ft.shape[0], -1).double().sum(0)
        self.total.index_add_(0, self.shell, p)
        self.count.index_add_(0, self.shell, torch.full_like(p, ft.shape[0]))

    def ready(self) -> bool:
        return bool(self.count.sum() > 0)

    def mean(self) -> Tensor:
        return self.total / self.count.clamp_min(1)


def candidate_scores(vft, band: FourierBand, X: Tensor, R: Tensor, s: Tensor, perturb: Tensor, E: Tensor, w: Tensor,
                     ctf: CTFParams | None, apix: float, batch_points: int) -> Tensor:
    """Matched-filter scores ``(n, J, T)`` of every candidate pose: rotation ``R @ perturb[j]``, shift
    ``s + delta_t`` (the ramps ``E``), for every particle (the score of the module docstring).

    ``X`` ``(n, P)``: image transforms on the band; ``R`` ``(n, 3, 3)``, ``s`` ``(n, 2)``: current poses
    (float64, CPU); ``perturb`` ``(J, 3, 3)``: rotations applied in the image frame, the same for every
    particle; ``E`` ``(P, T)``: ramps undoing each shift offset; ``w`` ``(P,)``: FSC weight / noise power;
    ``ctf``: per-particle parameters (``None``: no CTF). Projections are made ``batch_points`` samples at
    a time, so memory stays bounded whatever ``n``.
    """
    dev = X.device
    n, J, T = X.shape[0], perturb.shape[0], E.shape[1]
    d = band.crop
    b = max(1, batch_points // (J * d * d))
    Y = X * band.ramps(s.to(dev), torch.float32)                            # undo the current shift
    if ctf is not None:
        c = ctf_at_frequencies(ctf, band.kx[None] / apix, band.ky[None] / apix).to(torch.float32)
    scores = torch.empty(n, J, T, device=dev)
    Er, Ei = E.real.contiguous(), E.imag.contiguous()
    for a in range(0, n, b):
        sl = slice(a, min(n, a + b))
        m = sl.stop - a
        cand = (R[sl, None] @ perturb[None]).reshape(-1, 3, 3).to(dev, torch.float32)
        proj = project_at(vft, cand, band.idx_crop).reshape(m, J, -1)           # (m, J, P)
        if ctf is not None:
            proj = proj * c[sl, None]
        norm = torch.sqrt(((proj.real ** 2 + proj.imag ** 2) * w).sum(-1)).clamp_min(1e-30)  # (m, J)
        Z = proj.conj() * (Y[sl, None] * w)                                  # (m, J, P)
        del proj
        score = (Z.real.reshape(m * J, -1) @ Er - Z.imag.reshape(m * J, -1) @ Ei).reshape(m, J, T)
        del Z
        scores[sl] = score / norm[..., None]
    return scores
