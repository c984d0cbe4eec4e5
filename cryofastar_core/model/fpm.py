"""Fourier Planar Maps (FPM): the regression target of CryoFastAR.

Convention (internal, see :mod:`cryofastar_core.geometry`): ``R_i`` maps image-frame coordinates
to map-frame coordinates, and the centred 2D transform of image ``i`` at frequency ``ū`` equals
``V_hat(R_i ū)``. The central slice of image ``i`` is therefore the plane ``{R_i ū}`` in the map
frame. Expressed in the *reference image's* frame (map coords -> reference coords is ``R_0ᵀ``):

    X_i(u)  = R_0ᵀ R_i ū + h(t_i),     h(t) = (t_x / D, t_y / D, 0)ᵀ,   t = internal shift (px)
    X̃_i(u) = X_i(u) / 2 + 1/2         (normalised form, what the network predicts)

With row-vector matrices, the transposes of ours (cryoDRGN's:
:func:`bench.peers.peer_cryodrgn.poses_from_cryodrgn`), the same map reads ``R_0 R_iᵀ``. The reference's
own FPM is ``ū + h(t_0)``, the z = 0 plane. The shift is an *encoding*: a constant, unrotated offset,
read back as ``D ×`` the FPM centroid.

The grid ``ū`` is ``(x, y, 0)`` with ``x, y = linspace(-1, 1, D)``; pixel (row h, column w) holds
``(x = lin[w], y = lin[h])``, so x runs along image columns like the image's own x axis.

Mirror (hand) ambiguity: the z-mirrored map with rotations ``F R F`` (``F = diag(1, 1, -1)``)
gives the same images; in the reference frame ``F Q F ū = F Q ū``, so the mirror solution is every
auxiliary FPM with z negated (:func:`mirror_fpm`).
"""
from __future__ import annotations

import torch


def planar_grid(box: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The planar frequency grid ``ū``, shape ``(D, D, 3)``: ``grid[h, w] = (lin[w], lin[h], 0)``."""
    lin = torch.linspace(-1.0, 1.0, box, device=device, dtype=dtype)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)], dim=-1)


def relative_rotations(rot_ref: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``Q_i = R_0ᵀ R_i``: rotations ``(B, V, 3, 3)`` relative to the reference pose ``(B, 3, 3)``."""
    return rot_ref.transpose(-1, -2).unsqueeze(-3) @ rotations


def fpm_targets(rot_ref: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor, box: int,
                grid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised FPM targets ``X̃`` ``(B, V, *P, 3)`` at in-plane points ``grid`` ``(*P, 3)`` (z = 0).

    ``grid`` defaults to :func:`planar_grid` (``P = (D, D)``, the patch model's dense FPM); a line
    model passes its polar grid ``r_k u_l`` (``P = (L, K)``). ``rot_ref`` ``(B, 3, 3)`` is the
    reference image's pose (normally ``rotations[:, 0]``), ``rotations`` ``(B, V, 3, 3)`` and
    ``shifts`` ``(B, V, 2)`` (internal pixels) are those of the views. dtype and device follow
    ``rotations``.
    """
    rel = relative_rotations(rot_ref.to(rotations.dtype), rotations)
    if grid is None:
        grid = planar_grid(box, device=rotations.device, dtype=rotations.dtype)
    grid = grid.to(device=rotations.device, dtype=rotations.dtype)
    xyz = torch.einsum("bvij,...j->bv...i", rel, grid)
    offset = torch.zeros(*shifts.shape[:-1], 3, device=rotations.device, dtype=rotations.dtype)
    offset[..., :2] = shifts.to(rotations.dtype) / box
    return normalize(xyz + offset.reshape(*offset.shape[:2], *([1] * (grid.ndim - 1)), 3))


def normalize(xyz: torch.Tensor) -> torch.Tensor:
    """Un-normalised FPM ``X`` -> stored/predicted form ``X̃ = X/2 + 1/2``."""
    return xyz * 0.5 + 0.5


def denormalize(xyz_normalised: torch.Tensor) -> torch.Tensor:
    """Normalised FPM ``X̃`` -> ``X = 2 X̃ − 1`` (the frame of ``ū``)."""
    return 2.0 * xyz_normalised - 1.0


def mirror_fpm(xyz_normalised: torch.Tensor) -> torch.Tensor:
    """The other hand of normalised FPMs ``(..., V, P1, P2, 3)`` (dense ``D × D`` or polar ``L × K``): ``X̃_z -> 1 − X̃_z`` on auxiliary views.

    View 0 (the reference, the z = 0 plane) is returned unchanged.
    """
    out = xyz_normalised.clone()
    out[..., 1:, :, :, 2] = 1.0 - xyz_normalised[..., 1:, :, :, 2]
    return out
