"""A global pose assignment against a map: every particle scored at every orientation of a coarse grid.

Refinement's local search (:mod:`cryofastar_core.refine.passes`) only moves a pose a few degrees.
Feed-forward poses that are tens of degrees off still give a map with the right low-resolution shape, so
one global pass against that map, with the same CTF-aware, noise-whitened matched filter, brings poses
within the grid's spacing; the local iterations then take over.

The grid is the same for every particle (absolute orientations, not offsets from a pose), so the map is
projected once per pass, ``J`` projections of ``P`` band samples, and every particle's scores are one
real matrix product: with ``A = c w X e^{-2 pi i k.delta}`` per particle and shift offset (``c`` its CTF,
``w`` the noise weight, ``X`` its transform with its current shift undone) and ``B`` the projections,
``Re(A B^H) = A_r B_r^T + A_i B_i^T`` is the numerator of :func:`cryofastar_core.refine.matching.candidate_scores`
for every pair at once, and ``(c^2 w) |B|^2^T`` its norm. Cost per particle: ``T J P`` multiply-adds
(about 29 x 4,400 x 150 = 2e7 at 15 degrees, box 64), no projection.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cryofastar_core.geometry import relion_euler_to_matrix
from cryofastar_core.physics.ctf import CTFParams, ctf_at_frequencies
from cryofastar_core.physics.projection import VolumeFT, project_at
from cryofastar_core.refine.matching import FourierBand


def so3_grid(step_deg: float) -> Tensor:
    """Rotations ``(J, 3, 3)`` float64 (internal convention) covering SO(3) at about ``step_deg``.

    Viewing directions (the third column of ``R``) on a Fibonacci lattice of ``4 pi / step^2`` points,
    near-uniform on the sphere, times in-plane angles every ``step_deg`` (rounded to divide 360).
    """
    step = math.radians(step_deg)
    n_dir = max(2, round(4 * math.pi / step ** 2))
    k = torch.arange(n_dir, dtype=torch.float64) + 0.5
    tilt = torch.rad2deg(torch.acos(1 - 2 * k / n_dir))
    rot = torch.rad2deg(torch.remainder(math.pi * (1 + math.sqrt(5)) * k, 2 * math.pi))
    n_psi = max(1, round(360.0 / step_deg))
    psi = torch.arange(n_psi, dtype=torch.float64) * (360.0 / n_psi)
    R = relion_euler_to_matrix(rot[:, None].expand(-1, n_psi), tilt[:, None].expand(-1, n_psi),
                               psi[None, :].expand(n_dir, -1))
    return R.reshape(-1, 3, 3)


def grid_projections(vft: VolumeFT, band: FourierBand, grid: Tensor, chunk: int = 1024) -> Tensor:
    """Projections of ``vft`` at every ``grid`` rotation on the band: complex ``(J, P)``."""
    return torch.cat([project_at(vft, grid[a:a + chunk].to(vft.device, torch.float32), band.idx_crop)
                      for a in range(0, grid.shape[0], chunk)])


def best_on_grid(proj: Tensor, band: FourierBand, X: Tensor, s: Tensor, deltas: Tensor, w: Tensor,
                 ctf: CTFParams | None, apix: float, batch_scores: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
    """Best grid rotation and shift offset per particle.

    ``proj`` ``(J, P)``: :func:`grid_projections`; ``X`` ``(n, P)``: image transforms on the band;
    ``s`` ``(n, 2)``: current shifts (px, undone before matching); ``deltas`` ``(T, 2)``: shift offsets
    tried around them; ``w`` ``(P,)``: noise weight; ``ctf`` per particle or ``None``.
    Returns ``(j, t, score)``, each ``(n,)``: indices into the grid and ``deltas``, and the best score.
    Scores are formed ``batch_scores`` at a time, so memory stays bounded whatever ``n``.
    """
    n, J, dev = X.shape[0], proj.shape[0], X.device
    best_j = torch.empty(n, dtype=torch.long, device=dev)
    best_t = torch.empty(n, dtype=torch.long, device=dev)
    best = torch.empty(n, device=dev)
    for sl, score in _grid_scores(proj, band, X, s, deltas, w, ctf, apix, batch_scores):
        val, flat = score.reshape(score.shape[0], -1).max(-1)
        best_t[sl], best_j[sl], best[sl] = flat // J, flat % J, val
    return best_j, best_t, best


def peak_over_spread(proj: Tensor, band: FourierBand, X: Tensor, s: Tensor, deltas: Tensor, w: Tensor,
                     ctf: CTFParams | None, apix: float, batch_scores: int = 1 << 22) -> Tensor:
    """How far each particle's best grid rotation stands above its others: ``(best - mean) / sd`` over the
    grid's rotations of each rotation's best shift, ``(n,)``; arguments as :func:`best_on_grid`. A particle
    of the map's structure has one sharp peak; an image of another structure matches many rotations about
    equally (``bench/results/2026-12-06-junk.md``: AUC 0.86-0.89 against another protein, where the best
    score alone gives 0.57)."""
    out = torch.empty(X.shape[0], device=X.device)
    for sl, score in _grid_scores(proj, band, X, s, deltas, w, ctf, apix, batch_scores):
        per_rotation = score.max(1).values                                   # (m, J)
        mean, sd = per_rotation.mean(-1), per_rotation.std(-1).clamp_min(1e-30)
        out[sl] = (per_rotation.max(-1).values - mean) / sd
    return out


def _grid_scores(proj: Tensor, band: FourierBand, X: Tensor, s: Tensor, deltas: Tensor, w: Tensor,
                 ctf: CTFParams | None, apix: float, batch_scores: int):
    """``(rows, scores)`` per batch of particles: the matched-filter scores ``(m, T, J)`` of every shift offset
    and grid rotation (arguments as :func:`best_on_grid`)."""
    dev = X.device
    n, J, T = X.shape[0], proj.shape[0], deltas.shape[0]
    Br, Bi = proj.real.contiguous(), proj.imag.contiguous()
    B2 = (Br * Br + Bi * Bi).T.contiguous()                                  # (P, J)
    E = band.ramps(deltas.to(dev), torch.float32)                            # (T, P)
    Y = X * band.ramps(s.to(dev), torch.float32) * w                         # current shift undone, weighted
    c = None
    if ctf is not None:
        c = ctf_at_frequencies(ctf, band.kx[None] / apix, band.ky[None] / apix).to(torch.float32)
        Y = Y * c
    b = max(1, batch_scores // (T * J))
    for a in range(0, n, b):
        sl = slice(a, min(n, a + b))
        m = sl.stop - a
        A = (Y[sl, None, :] * E[None]).reshape(m * T, -1)                    # (m T, P)
        num = (A.real @ Br.T + A.imag @ Bi.T).reshape(m, T, J)
        cw = (c[sl] ** 2 if c is not None else torch.ones(m, w.numel(), device=dev)) * w
        norm = torch.sqrt(cw @ B2).clamp_min(1e-30)                          # (m, J)
        yield sl, num / norm[:, None, :]
