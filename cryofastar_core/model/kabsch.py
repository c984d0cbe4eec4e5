"""Pose from a (predicted) FPM: weighted Kabsch / orthogonal Procrustes.

For an un-normalised FPM ``X̂`` ``(..., D, D, 3)`` and weights ``w`` we find the proper rotation
``Q`` and offset ``c`` minimising ``Σ w ‖X̂(u) − (Q ū + c)‖²``:

* centroids ``ū_c = Σ w ū / Σ w`` and ``X_c = Σ w X̂ / Σ w``; ``c = X_c − Q ū_c``;
* ``Q`` maximises ``tr(Qᵀ A₃)`` with ``A₃ = Σ w (X̂ − X_c)(ū − ū_c)ᵀ``. ``ū`` lies in z = 0, so
  ``A₃ = [a, b, 0]`` has rank 2 and the SVD solution ``Q = U diag(1, 1, det(U Vᵀ)) Vᵀ`` reduces to
  the polar factor of the 3×2 matrix ``A = [a, b]`` for the first two columns, with the third column
  their cross product (the det correction). The polar factor is computed in closed form,
  ``A G^{-1/2}`` with ``G = AᵀA`` (2×2), using ``√G = (G + √det G · I) / √(tr G + 2 √det G)``.
  This equals the SVD answer but stays differentiable where the SVD is not: a uniform square grid
  makes the two non-zero singular values equal, and the SVD backward then divides by zero.

Relation to poses (internal convention, :mod:`cryofastar_core.model.fpm`): ``Q ≈ R_0ᵀ R_i``, so the
pose in the map frame is ``R_i = R_0 Q`` (``= Q`` with the reference at ``R_0 = I``) and the shift is
``t = D · c_xy`` pixels. With non-uniform weights ``c`` (not the raw centroid) is what removes the bias
of the weighted centroid of ``ū``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cryofastar_core.model.fpm import planar_grid


@dataclass
class KabschResult:
    """``rotation`` ``(..., 3, 3)`` ``Q ≈ R_0ᵀ R_i``; ``shift`` ``(..., 2)`` pixels ``(x, y)``;
    ``residual`` ``(...,)`` weighted RMS of ``‖X̂ − (Q ū + c)‖`` in the units of ``ū`` (which spans
    [−1, 1]; multiply by ``(D − 1) / 2`` for grid steps)."""

    rotation: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor


def kabsch(fpm: torch.Tensor, weights: torch.Tensor | None, box: int,
           grid: torch.Tensor | None = None) -> KabschResult:
    """Fit ``X̂ ≈ Q ū + c`` for un-normalised FPMs ``fpm`` ``(..., P1, P2, 3)`` at the in-plane points
    ``grid`` ``(P1, P2, 3)`` (z = 0; default :func:`planar_grid` of ``box``, a line model's polar grid
    otherwise). ``box`` converts the offset to pixels.

    ``weights`` ``(..., P1, P2)`` (non-negative, e.g. the confidence ``C``) or ``None`` for plain
    Kabsch. Batched over the leading dimensions and differentiable.
    """
    dtype = fpm.dtype
    if grid is None:
        grid = planar_grid(box, device=fpm.device, dtype=dtype)
    points = grid.shape[:-1]
    if grid.ndim != 3 or fpm.shape[-3:] != grid.shape:
        raise ValueError(f"fpm must end in {tuple(grid.shape)}, got {tuple(fpm.shape)}")
    n = points[0] * points[1]
    grid = grid.to(device=fpm.device, dtype=dtype).reshape(-1, 3)  # (P, 3)
    X = fpm.reshape(*fpm.shape[:-3], n, 3)  # (..., P, 3)
    if weights is None:
        w = torch.full(X.shape[:-1], 1.0 / n, device=fpm.device, dtype=dtype)
    else:
        if weights.shape[-2:] != points:
            raise ValueError(f"weights must end in {tuple(points)}, got {tuple(weights.shape)}")
        w = weights.to(dtype).reshape(*weights.shape[:-2], n).expand(X.shape[:-1])
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    grid_c = w @ grid  # (..., 3), z = 0
    X_c = (w[..., None] * X).sum(-2)  # (..., 3)
    p = grid[..., :2] - grid_c[..., None, :2]  # (..., P, 2)
    q = X - X_c[..., None, :]  # (..., P, 3)
    A = (q * w[..., None]).transpose(-1, -2) @ p  # (..., 3, 2) = [a, b]
    frame = _polar_3x2(A)
    third = torch.linalg.cross(frame[..., 0], frame[..., 1], dim=-1)
    Q = torch.cat([frame, third[..., None]], dim=-1)
    c = X_c - (Q @ grid_c[..., None])[..., 0]
    fitted = grid @ Q.transpose(-1, -2) + c[..., None, :]
    residual = torch.sqrt((w * ((X - fitted) ** 2).sum(-1)).sum(-1).clamp_min(0))
    return KabschResult(rotation=Q, shift=c[..., :2] * box, residual=residual)


def _polar_3x2(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor ``A (AᵀA)^{-1/2}`` of ``(..., 3, 2)`` matrices in closed form.

    An all-zero ``A`` (every point predicted at one place, as a freshly initialised auxiliary head
    does) has no polar factor; it gets the identity frame instead of a zero matrix, so the result is
    always a rotation.
    """
    flat = A.abs().flatten(-2).amax(-1)[..., None, None]
    eye = torch.zeros_like(A)
    eye[..., 0, 0] = 1.0
    eye[..., 1, 1] = 1.0
    A = torch.where(flat > torch.finfo(A.dtype).tiny ** 0.25, A, eye)
    G = A.transpose(-1, -2) @ A  # (..., 2, 2), symmetric positive semi-definite
    eps = torch.finfo(A.dtype).eps
    tr = (G[..., 0, 0] + G[..., 1, 1]).clamp_min(torch.finfo(A.dtype).tiny)
    det = G[..., 0, 0] * G[..., 1, 1] - G[..., 0, 1] * G[..., 1, 0]
    # eps·tr keeps a collapsed (rank-1) prediction finite; its effect is at machine precision.
    s = torch.sqrt(det.clamp_min(0)) + eps * tr
    t = torch.sqrt(tr + 2 * s)
    # √G = (G + sI)/t  ->  G^{-1/2} = t · (G + sI)^{-1}, inverted via the 2×2 adjugate.
    m00, m11, m01 = G[..., 0, 0] + s, G[..., 1, 1] + s, G[..., 0, 1]
    mdet = (m00 * m11 - m01 * m01).clamp_min(torch.finfo(A.dtype).tiny)
    inv_sqrt = torch.stack([torch.stack([m11, -m01], -1), torch.stack([-m01, m00], -1)], -2)
    inv_sqrt = inv_sqrt * (t / mdet)[..., None, None]
    return A @ inv_sqrt
