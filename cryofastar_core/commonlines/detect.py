"""The common line of every pair of views: the pair of half-lines whose contents agree best.

For views ``i < j`` the search runs over all ``L`` half-lines of ``i`` and the first ``L/2`` of
``j`` (line ``φ + π`` of ``j`` is the conjugate of line ``φ``, and conjugating both halves gives the
same score, so the other half adds nothing), and over a small relative shift ``s`` along the line
(a shift of an image moves each of its lines by its projection on the line: after centring, what
is left is small). The score is the real part of the normalised inner product of the two lines'
samples over the band, each radius divided by a power of its mean power over all views (``whiten``).

The two angles are refined below a line step by a parabola through the neighbouring scores. The
angles returned are *consistent*: ``R_i u(angles[i, j]) = R_j u(angles[j, i])`` (the same 3D
direction, not its opposite), which the synchronisation relies on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryofastar_core.refine.grids import parabola_vertex


@dataclass
class CommonLines:
    """``angles`` ``(N, N)`` radians: ``angles[i, j]`` is the in-plane angle in view ``i`` of its
    common line with view ``j`` (diagonal 0); ``score`` ``(N, N)`` symmetric, the matched lines'
    normalised correlation (diagonal 0), for diagnostics."""

    angles: Tensor
    score: Tensor


def line_features(lines: Tensor, whiten: float = 1.0) -> Tensor:
    """Lines ``(N, L, K)`` complex -> unit-norm complex features ``(N, L, K)``: each radius divided by
    its mean power over all views and angles to the power ``whiten / 2`` (1: every radius counts
    alike; 0: as the images' spectrum falls), then each line scaled to norm 1."""
    power = lines.abs().pow(2).mean(dim=(0, 1)).clamp_min(1e-20)
    white = lines / power.pow(whiten / 2)
    white = white / torch.linalg.vector_norm(white, dim=-1, keepdim=True).clamp_min(1e-20)
    return white


def _as_real(z: Tensor) -> Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def shift_ramps(radii: Tensor | tuple[float, ...], shifts: tuple[float, ...], box: int, device=None) -> Tensor:
    """``(S, K)`` complex: a line's samples at ``radii`` Fourier pixels of a ``box``-pixel image, moved by
    each of ``shifts`` px along the line, are multiplied by ``exp(2πi r s / D)``."""
    radii_t = torch.as_tensor(radii, dtype=torch.float32, device=device)
    s = torch.as_tensor(shifts, dtype=torch.float32, device=device)
    return torch.polar(torch.ones(len(s), len(radii_t), device=device), 2 * math.pi * s[:, None] * radii_t[None, :] / box)


def _near_prior(prior_i: Tensor, prior_j: Tensor, n_lines: int, window: int) -> Tensor:
    """``(M, L, L/2)`` bool: the half-line pairs ``(θ, φ)`` within ``window`` line steps of each pair's
    prior common line ``(prior_i, prior_j)`` ``(M,)`` radians, in both angles, counting the conjugate
    pair ``(θ + π, φ + π)`` as the same line."""
    step = 2 * math.pi / n_lines
    half = n_lines // 2
    dev = prior_i.device
    theta = torch.arange(n_lines, device=dev, dtype=torch.float64)
    phi = torch.arange(half, device=dev, dtype=torch.float64)

    def cyc(x: Tensor) -> Tensor:
        return (torch.remainder(x + half, n_lines) - half).abs()

    a, b = (prior_i / step)[:, None, None], (prior_j / step)[:, None, None]
    direct = torch.maximum(cyc(theta[None, :, None] - a), cyc(phi[None, None, :] - b))
    conj = torch.maximum(cyc(theta[None, :, None] + half - a), cyc(phi[None, None, :] + half - b))
    return torch.minimum(direct, conj) <= window


def detect_common_lines(features: Tensor, ramps: Tensor, prior: Tensor | None = None,
                        window: int = 0) -> CommonLines:
    """Common lines of every pair of views from their unit line features ``(N, L, K)`` complex
    (:func:`line_features`, or a learned encoder's), searching the relative shifts whose phase ramps
    ``(S, K)`` are given (:func:`shift_ramps`). With ``prior`` ``(N, N)`` radians (another detection's
    angles), each pair's search is limited to within ``window`` line steps of its prior common line."""
    n, n_lines, _ = features.shape
    half = n_lines // 2
    dev = features.device
    # line φ of j moved by s along itself
    moved = _as_real(features[:, None, :half, :] * ramps[None, :, None, :])  # (N, S, L/2, 2K)
    mine = _as_real(features)  # (N, L, 2K)
    angles = torch.zeros(n, n, dtype=torch.float64, device=dev)
    score = torch.zeros(n, n, dtype=torch.float32, device=dev)
    step = 2 * math.pi / n_lines
    for i in range(n - 1):
        others = moved[i + 1:]  # (M, S, L/2, 2K)
        m = others.shape[0]
        corr = torch.einsum("lc,mspc->mslp", mine[i], others)  # (M, S, L, L/2)
        searched = corr
        if prior is not None:
            near = _near_prior(prior[i, i + 1:], prior[i + 1:, i], n_lines, window)
            searched = corr.masked_fill(~near[:, None], -math.inf)
        flat = searched.reshape(m, -1)
        best, where = flat.max(dim=1)
        si, rest = where // (n_lines * half), where % (n_lines * half)
        li, pj = rest // half, rest % half
        # sub-step refinement of each angle by a parabola through its neighbours (cyclic in θ;
        # φ's neighbours past the half turn are the conjugate lines, i.e. θ shifted by π)
        rows = torch.arange(m, device=dev)
        plane = corr[rows, si]  # (M, L, L/2)
        d_theta = parabola_vertex(plane[rows, (li - 1) % n_lines, pj], best, plane[rows, (li + 1) % n_lines, pj])
        lo_phi = torch.where(pj > 0, plane[rows, li, (pj - 1).clamp_min(0)], plane[rows, (li + half) % n_lines, half - 1])
        hi_phi = torch.where(pj < half - 1, plane[rows, li, (pj + 1).clamp_max(half - 1)], plane[rows, (li + half) % n_lines, 0])
        d_phi = parabola_vertex(lo_phi, best, hi_phi)
        angles[i, i + 1:] = (li.double() + d_theta.double()) * step
        angles[i + 1:, i] = (pj.double() + d_phi.double()) * step
        score[i, i + 1:] = best
        score[i + 1:, i] = best
    return CommonLines(angles=angles, score=score)
