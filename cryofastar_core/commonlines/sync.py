"""Rotations from common lines in closed form: votes over triangles, then synchronisation.

Notation: ``R_i`` maps view ``i``'s image frame to the map frame (:mod:`cryofastar_core.model.fpm`);
``c_ij`` the unit 2D direction, in view ``i``, of its common line with ``j``, so that
``e_ij = R_i (c_ij, 0) = R_j (c_ji, 0)`` (:mod:`~.detect` returns consistent pairs).

**Angle between two views' planes, from a third view.** For views ``i, j, k`` the three 3D common
lines ``e_ij, e_ik, e_jk`` have pairwise dot products read straight off the images:
``a = e_ij·e_ik = c_ij·c_ik`` (in view ``i``), ``b = e_ij·e_jk = c_ji·c_jk`` (view ``j``),
``c = e_ik·e_jk = c_ki·c_kj`` (view ``k``). The normal of view ``i`` is
``n_i = e_ij × e_ik / σ_i`` with ``σ_i = c_ij × c_ik`` (the 2D cross product: signed sine), and
likewise ``n_j = e_ij × e_jk / σ_j``; so by the identity ``(p×q)·(p×r) = q·r − (p·q)(p·r)``

    cos θ_ij = n_i · n_j = (c − a b) / (σ_i σ_j),

the spherical law of cosines. Every third view votes; with noise some votes are wrong, so the angle
is the peak of the votes smoothed by a Gaussian kernel (the voting of Singer et al., 2010), and the
fraction of votes near the peak is the pair's weight.

**Relative rotation.** ``M_ij = R_iᵀ R_j`` maps ``(c_ji, 0)`` to ``(c_ij, 0)`` and ``e_z`` to a normal
at angle ``θ_ij`` from ``e_z``; its upper-left 2×2 block is

    G_ij = c_ij c_jiᵀ + cos θ_ij c_ij⊥ c_ji⊥ᵀ,       c⊥ = (−c_y, c_x),

the same for both signs of ``sin θ_ij`` — the two hands — so the hand never has to be decided pair
by pair.

**Synchronisation.** ``G_ij = Y_i Y_jᵀ`` with ``Y_i = (R_i e_x, R_i e_y)ᵀ`` (2×3): the ``2N × 2N``
matrix of blocks has rank 3, and its top three eigenvectors span the columns of ``Y`` up to an
invertible 3×3 map ``B``. ``B`` is fixed by asking every ``Y_i`` to have orthonormal rows (a linear
least-squares problem in ``W = B Bᵀ``), each ``Y_i`` is then rounded to the nearest pair of
orthonormal rows, and ``R_i e_z`` completes it. The result is ``R_i`` up to one global rotation and
one global hand, which no set of images can fix.

**Refinement.** The eigenvectors are exact only when every pair counts equally; weighting pairs by
their votes (so that wrong common lines count less) bends them. So the spectral answer only starts a
robust least-squares fit of the common lines themselves, ``Σ w_ij ‖R_i (c_ij, 0) − R_j (c_ji, 0)‖``
(unsquared: a wrong common line pulls with a bounded force, as in least unsquared deviations), by
iteratively reweighted Procrustes: each ``R_i`` is the rotation that best maps its lines
``(c_ij, 0)`` onto their 3D directions ``R_j (c_ji, 0)`` under the current weights. Exact common
lines are a fixed point whatever the weights.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _directions(angles: Tensor) -> Tensor:
    return torch.stack([torch.cos(angles), torch.sin(angles)], -1)


def _cross2(p: Tensor, q: Tensor) -> Tensor:
    return p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]


def triangle_cosines(angles: Tensor, i: int, min_sine: float = 0.1) -> tuple[Tensor, Tensor]:
    """``cos θ_ij`` of view ``i`` with every view ``j`` as voted by each third view ``k``: ``(N, N)``
    indexed ``[j, k]``, and a validity mask of the same shape (``k`` distinct from ``i, j``, both in-plane
    angles of the triangle farther than ``asin(min_sine)`` from 0 and π, and ``|cos θ| ≤ 1`` up to
    rounding). One view at a time: memory ``N²``, not ``N³`` (hundreds of class averages)."""
    n = angles.shape[0]
    c = _directions(angles.double())  # (N, N, 2) c[i, j]
    ci, to_i = c[i], c[:, i]  # c_ij (N, 2) over j; c_ji (N, 2) over j
    a = ci @ ci.T  # [j, k] = c_ij · c_ik
    b = torch.einsum("jd,jkd->jk", to_i, c)  # [j, k] = c_ji · c_jk
    cc = torch.einsum("kd,kjd->jk", to_i, c)  # [j, k] = c_ki · c_kj
    s_i = _cross2(ci[:, None, :], ci[None, :, :])  # [j, k] = c_ij × c_ik
    s_j = _cross2(to_i[:, None, :], c)  # [j, k] = c_ji × c_jk
    den = s_i * s_j
    cos = (cc - a * b) / torch.where(den.abs() > 0, den, torch.ones_like(den))
    idx = torch.arange(n, device=angles.device)
    distinct = (idx[:, None] != idx[None, :]) & (idx[:, None] != i) & (idx[None, :] != i)
    valid = distinct & (s_i.abs() > min_sine) & (s_j.abs() > min_sine) & (cos.abs() <= 1 + 1e-6)
    return cos.clamp(-1, 1), valid


def vote_dihedral_angles(angles: Tensor, sigma_deg: float = 3.0, bins: int = 180) -> tuple[Tensor, Tensor]:
    """Angle between every two views' planes, ``cos θ_ij`` ``(N, N)``, and its weight ``(N, N)`` in
    [0, 1] (the share of third views whose vote lies within ``2 σ`` of the peak), from the common-line
    angles ``(N, N)`` (:class:`~.detect.CommonLines`). Diagonal: cos 1, weight 0."""
    n = angles.shape[0]
    sigma = math.radians(sigma_deg)
    grid = torch.linspace(0, math.pi, bins, dtype=torch.float64, device=angles.device)
    out_cos = torch.ones(n, n, dtype=torch.float64, device=angles.device)
    weight = torch.zeros(n, n, dtype=torch.float64, device=angles.device)
    for i in range(n):  # one row of pairs at a time keeps memory at N² × bins
        cos, valid = triangle_cosines(angles, i)
        t, v = torch.arccos(cos), valid.to(torch.float64)  # (N, N) [j, k], θ in [0, π]
        density = (torch.exp(-0.5 * ((t[..., None] - grid) / sigma) ** 2) * v[..., None]).sum(1)  # (N, bins)
        peak = grid[density.argmax(-1)]  # (N,)
        near = v * ((t - peak[:, None]).abs() < 2 * sigma).to(t.dtype)
        votes = near.sum(-1)
        mean = (t * near).sum(-1) / votes.clamp_min(1)
        out_cos[i] = torch.where(votes > 0, torch.cos(mean), torch.ones_like(mean))
        weight[i] = votes / max(n - 2, 1)
    weight.fill_diagonal_(0)
    out_cos.fill_diagonal_(1)
    # the two orders of a pair see the same triangles; average them so the blocks are symmetric
    return 0.5 * (out_cos + out_cos.T), 0.5 * (weight + weight.T)


def relative_blocks(angles: Tensor, cos_theta: Tensor) -> Tensor:
    """Upper-left 2×2 blocks of ``R_iᵀ R_j`` ``(N, N, 2, 2)`` from common-line angles and ``cos θ_ij``."""
    c = _directions(angles.double())
    cp = torch.stack([-c[..., 1], c[..., 0]], -1)
    c_ij, c_ji = c, c.transpose(0, 1)
    p_ij, p_ji = cp, cp.transpose(0, 1)
    return c_ij[..., :, None] * c_ji[..., None, :] + cos_theta[..., None, None] * p_ij[..., :, None] * p_ji[..., None, :]


def synchronize(blocks: Tensor, weight: Tensor | None = None) -> Tensor:
    """Rotations ``(N, 3, 3)`` (up to a global rotation and hand) from relative blocks
    ``(N, N, 2, 2)`` (``G_ij``, e.g. :func:`relative_blocks`), each pair weighted by ``weight``
    ``(N, N)`` (default 1); the diagonal is taken as the identity."""
    n = blocks.shape[0]
    w = torch.ones(n, n, dtype=blocks.dtype, device=blocks.device) if weight is None else weight.to(blocks)
    w = w.clone()
    w.fill_diagonal_(1.0)
    g = blocks.clone()
    idx = torch.arange(n, device=blocks.device)
    g[idx, idx] = torch.eye(2, dtype=blocks.dtype, device=blocks.device)
    s = (g * w[..., None, None]).permute(0, 2, 1, 3).reshape(2 * n, 2 * n)
    s = 0.5 * (s + s.T)
    evals, evecs = torch.linalg.eigh(s)
    top = evecs[:, -3:] * evals[-3:].clamp_min(1e-12).sqrt()  # (2N, 3), Y up to a linear map
    y = top.reshape(n, 2, 3)
    b = _orthonormalising_map(y)
    rows = _nearest_orthonormal_rows(y @ b)  # (N, 2, 3): rows R_i e_x, R_i e_y
    third = torch.linalg.cross(rows[:, 0], rows[:, 1], dim=-1)
    return torch.stack([rows[:, 0], rows[:, 1], third], -1)  # columns


def _orthonormalising_map(y: Tensor) -> Tensor:
    """``B`` (3×3) such that the rows of every ``y_i B`` are as near orthonormal as least squares
    allows: solve ``y_i W y_iᵀ = I₂`` for symmetric ``W`` (6 unknowns), then ``W = B Bᵀ``."""
    u, v = y[:, 0], y[:, 1]  # (N, 3)
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]

    def row(p: Tensor, q: Tensor) -> Tensor:
        return torch.stack([p[:, a] * q[:, b] + (p[:, b] * q[:, a] if a != b else 0) for a, b in pairs], -1)

    a = torch.cat([row(u, u), row(v, v), row(u, v)])
    rhs = torch.cat([torch.ones(len(u)), torch.ones(len(u)), torch.zeros(len(u))]).to(y)
    sol = torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0]
    w = torch.zeros(3, 3, dtype=y.dtype, device=y.device)
    for (a_, b_), val in zip(pairs, sol):
        w[a_, b_] = val
        w[b_, a_] = val
    evals, evecs = torch.linalg.eigh(w)
    return evecs * evals.clamp_min(1e-12).sqrt()


def _nearest_orthonormal_rows(m: Tensor) -> Tensor:
    """The nearest ``(…, 2, 3)`` with orthonormal rows (polar factor by SVD)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def refine_rotations(rotations: Tensor, angles: Tensor, weight: Tensor, iterations: int = 30,
                     floor: float = 1e-3) -> Tensor:
    """Rotations ``(N, 3, 3)`` moved to fit the common lines ``angles`` ``(N, N)`` under pair weights
    ``weight`` ``(N, N)`` by iteratively reweighted Procrustes (the module docstring's refinement);
    ``floor`` bounds the reweighting of pairs that already agree."""
    rot = rotations.double()
    c = _directions(angles.double())
    planar = torch.cat([c, torch.zeros_like(c[..., :1])], -1)  # (N, N, 3): (c_ij, 0)
    w0 = weight.double().clone()
    w0.fill_diagonal_(0)
    for _ in range(iterations):
        target = torch.einsum("jab,jib->ija", rot, planar)  # [i, j] = R_j (c_ji, 0)
        mine = torch.einsum("iab,ijb->ija", rot, planar)  # [i, j] = R_i (c_ij, 0)
        residual = (mine - target).norm(dim=-1)
        w = w0 / residual.clamp_min(floor)
        a = torch.einsum("ij,ija,ijb->iab", w, target, planar)[..., :2]  # (N, 3, 2)
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        frame = u @ vh
        third = torch.linalg.cross(frame[..., 0], frame[..., 1], dim=-1)
        rot = torch.cat([frame, third[..., None]], -1)
    return rot
