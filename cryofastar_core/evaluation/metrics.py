"""Evaluation metrics: pose errors after global alignment, translation errors, and
FSC resolution against a ground-truth map.

Frames: an ab initio result is defined only up to a global rotation of the map frame and the hand.
In the internal convention (``R`` maps image to map coordinates) a change of map frame
``x' = G x`` turns every pose into ``G R``; the mirrored solution (map flipped in z,
``F = diag(1, 1, -1)``) has poses ``F R F``. So predictions are compared as ``G R_pred`` or
``G F R_pred F``, with ``G`` the chordal-L2 best fit (SVD of ``sum_i R_true_i R_pred_i^T``).

The map reconstructed from predicted poses lives in the predicted frame: ``V_pred(y) = V_true(G y)``
(or ``V_true(G F y)`` when mirrored), so it is brought into the truth frame by sampling it at
``G^T w`` (or ``F G^T w``) before the FSC (:func:`align_map_to_truth`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F_nn

from cryofastar_core.geometry import FLIP_Z, rotation_angle_deg
from cryofastar_core.reconstruct.fsc import fsc, resolution_at


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64).cpu()


def _median(x: torch.Tensor) -> float:
    """The usual median (mean of the two middle values for even counts; torch's is the lower one)."""
    return float(torch.quantile(x, 0.5))


def _project_so3(M: torch.Tensor) -> torch.Tensor:
    """Nearest rotation (Frobenius) to a 3x3 matrix: ``U diag(1, 1, det(U V^T)) V^T``."""
    U, _, Vt = torch.linalg.svd(M)
    d = torch.sign(torch.det(U @ Vt))
    D = torch.diag(torch.tensor([1.0, 1.0, float(d) if d != 0 else 1.0], dtype=M.dtype))
    return U @ D @ Vt


def chordal_mean(R: torch.Tensor) -> torch.Tensor:
    """The rotation nearest (Frobenius) to the mean of rotations ``R`` ``(n, 3, 3)``: their chordal mean."""
    return _project_so3(_as64(R).sum(0))


def _fit(R_pred: torch.Tensor, R_true: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Best ``G`` for ``G R_pred ~ R_true`` and the mean squared Frobenius residual."""
    G = _project_so3((R_true @ R_pred.transpose(-1, -2)).sum(0))
    res = ((R_true - G @ R_pred) ** 2).sum((-1, -2)).mean()
    return G, float(res)


def align_rotations(R_pred, R_true, allow_mirror: bool = True) -> tuple[np.ndarray, bool]:
    """Global rotation ``G (3, 3)`` minimising ``sum_i ||R_true_i - G R'_i||_F^2`` and whether
    ``R'_i = F R_pred_i F`` (mirror, ``mirrored=True``) fits better than ``R'_i = R_pred_i``.

    ``R_pred``, ``R_true``: ``(N, 3, 3)`` internal rotations of the same particles.
    """
    Rp, Rt = _as64(R_pred), _as64(R_true)
    if Rp.shape != Rt.shape or Rp.ndim != 3 or Rp.shape[-2:] != (3, 3) or len(Rp) == 0:
        raise ValueError(f"need two (N, 3, 3) rotation arrays of the same N >= 1, got {tuple(Rp.shape)}, {tuple(Rt.shape)}")
    G, res = _fit(Rp, Rt)
    if allow_mirror:
        F = FLIP_Z.to(torch.float64)
        Gm, res_m = _fit(F @ Rp @ F, Rt)
        if res_m < res - 1e-12:
            return Gm.numpy(), True
    return G.numpy(), False


def apply_alignment(R_pred, G, mirrored: bool) -> torch.Tensor:
    """``G R_pred`` or ``G F R_pred F``, float64 ``(N, 3, 3)``."""
    Rp = _as64(R_pred)
    if mirrored:
        F = FLIP_Z.to(torch.float64)
        Rp = F @ Rp @ F
    return _as64(G) @ Rp


def rotation_errors(R_pred, R_true, allow_mirror: bool = True) -> dict:
    """Pose errors after global alignment: ``median_deg``, ``mean_deg`` (geodesic angle),
    ``mean_fnorm`` (``||R_true - G R_pred||_F``), ``median_fnorm``,
    ``mirrored`` and ``G`` (list of lists)."""
    G, mirrored = align_rotations(R_pred, R_true, allow_mirror)
    Ra = apply_alignment(R_pred, G, mirrored)
    Rt = _as64(R_true)
    ang = rotation_angle_deg(Ra, Rt)
    fn = torch.linalg.norm((Rt - Ra).reshape(len(Rt), 9), dim=-1)
    return {"median_deg": _median(ang), "mean_deg": float(ang.mean()),
            "mean_fnorm": float(fn.mean()), "median_fnorm": _median(fn),
            "mirrored": bool(mirrored), "G": np.asarray(G).tolist(), "n": int(len(Rt))}


def mate_errors(R_pred, R_true, allow_mirror: bool = True, min_fraction: float = 0.02) -> dict:
    """Pose errors allowing one 180°-type "mate" of the map frame: for a structure with a (pseudo-)symmetry
    axis, refinement can put a particle at ``S G R_true``-like poses that the symmetry nearly explains.

    Particles more than 90° off after the global alignment are taken as the mate's; ``S`` (map frame) is
    their chordal mean relative rotation, and ``G`` is refitted with their truths brought back by ``S^T``
    (three rounds), so the mates do not pull the alignment. Returns ``mate_fraction`` (particles closer to
    ``S G R`` than to ``G R``), ``mate_angle_deg`` (the angle of ``S``; ``None`` when fewer than
    ``min_fraction`` of the particles are far off), ``mate_spread_deg`` (median angle between each mate's
    relative rotation and ``S``: small when it is one operation, not scatter) and ``median_deg_modulo_mate``
    (each particle's error to the nearer of the two). For an asymmetric structure a mate is still a wrong
    pose: it puts the particle's high-resolution detail in the wrong place.
    """
    G, mirrored = align_rotations(R_pred, R_true, allow_mirror)
    Ra, Rt = apply_alignment(R_pred, G, mirrored), _as64(R_true)
    ang = rotation_angle_deg(Ra, Rt)
    far = ang > 90
    if float(far.double().mean()) < min_fraction:
        return {"mate_fraction": float(far.double().mean()), "mate_angle_deg": None, "mate_spread_deg": None,
                "median_deg_modulo_mate": _median(ang)}
    Ra0 = Ra
    for _ in range(3):
        S = _project_so3((Rt[far] @ Ra[far].transpose(-1, -2)).sum(0))
        back = torch.where(far[:, None, None], S.T @ Rt, Rt)
        Ra = _fit(Ra0, back)[0] @ Ra0
        ang_same, ang_mate = rotation_angle_deg(Ra, Rt), rotation_angle_deg(S @ Ra, Rt)
        far = ang_mate < ang_same
    S = _project_so3((Rt[far] @ Ra[far].transpose(-1, -2)).sum(0))
    spread = rotation_angle_deg(Rt[far] @ Ra[far].transpose(-1, -2), S.expand(int(far.sum()), 3, 3))
    return {"mate_fraction": float(far.double().mean()),
            "mate_angle_deg": float(rotation_angle_deg(S[None], torch.eye(3, dtype=S.dtype)[None])[0]),
            "mate_spread_deg": _median(spread),
            "median_deg_modulo_mate": _median(torch.minimum(rotation_angle_deg(Ra, Rt), rotation_angle_deg(S @ Ra, Rt)))}


def translation_errors(t_pred, t_true) -> dict:
    """``||t_pred - t_true||_2`` per particle (px): ``mean_px``, ``median_px``.

    Shifts are in the image frame, so neither a global rotation of the map about its centre nor
    the mirror changes them.
    """
    tp, tt = _as64(t_pred), _as64(t_true)
    if tp.shape != tt.shape or tp.ndim != 2 or tp.shape[-1] != 2:
        raise ValueError(f"need two (N, 2) shift arrays, got {tuple(tp.shape)}, {tuple(tt.shape)}")
    d = torch.linalg.norm(tp - tt, dim=-1)
    return {"mean_px": float(d.mean()), "median_px": _median(d)}


def translation_errors_origin_aligned(t_pred, t_true, R_true) -> dict:
    """Shift errors once the frame's origin is aligned too: an ab initio map's origin is as free as its
    orientation, and moving it by ``o`` ``(3,)`` px moves every particle's shift by ``(R^T o)_xy``
    (:func:`cryofastar_core.refine.map_registration.shifts_after_moving_map`). ``o`` is the least-squares fit
    over all particles (``R_true`` ``(N, 3, 3)``); returns ``median_px``, ``mean_px`` after removing it and
    ``origin_offset_px`` (``|o|``)."""
    tp, tt, R = _as64(t_pred), _as64(t_true), _as64(R_true)
    d = tp - tt
    A = R.transpose(-1, -2)[:, :2, :].reshape(-1, 3)
    o = torch.linalg.lstsq(A, d.reshape(-1, 1)).solution[:, 0]
    rest = (d.reshape(-1) - A @ o).reshape(-1, 2).norm(dim=-1)
    return {"median_px": _median(rest), "mean_px": float(rest.mean()), "origin_offset_px": float(o.norm())}


def resample_volume(vol, M, offset=None) -> torch.Tensor:
    """``out(w) = vol(M (w - offset))`` for every voxel ``w`` (coordinates ``(x, y, z)`` in px about index
    ``n // 2``), trilinear, zero outside. ``vol``: ``(D, D, D)`` ``V[z, y, x]``; ``M``: ``(3, 3)``;
    ``offset``: ``(3,)`` px, none by default."""
    v = torch.as_tensor(vol)
    dtype = v.dtype if v.is_floating_point() else torch.float32
    v = v.to(dtype)
    n = v.shape[-1]
    c = n // 2
    r = torch.arange(n, dtype=torch.float64, device=v.device) - c
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    w = torch.stack([x, y, z], -1)  # (D, D, D, 3) as (x, y, z)
    if offset is not None:
        w = w - _as64(offset).to(v.device)
    src = w @ _as64(M).to(v.device).T
    # align_corners=True: normalised -1 / +1 are the centres of voxels 0 / n - 1.
    grid = (2 * (src + c) / (n - 1) - 1).to(dtype)
    out = F_nn.grid_sample(v[None, None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0]


def rotate_volume(vol, G) -> torch.Tensor:
    """The volume's content rotated by ``G`` about the box centre: ``out(w) = vol(G^T w)``."""
    return resample_volume(vol, _as64(G).T)


def align_map_to_truth(vol, G, mirrored: bool = False) -> torch.Tensor:
    """A map reconstructed with predicted poses, moved into the truth frame found by
    :func:`align_rotations`: ``out(w) = vol(G^T w)``, or ``vol(F G^T w)`` if ``mirrored``."""
    M = _as64(G).T
    if mirrored:
        M = FLIP_Z.to(torch.float64) @ M
    return resample_volume(vol, M)


def flip_hand(vol) -> torch.Tensor:
    """The z-mirror ``out(x, y, z) = vol(x, y, -z)`` about the box centre."""
    return resample_volume(vol, FLIP_Z)


def map_resolution(vol, truth, apix: float, threshold: float = 0.5, G=None, mirrored: bool = False,
                   try_mirror: bool = True) -> float:
    """FSC resolution (Å) of ``vol`` against the ground-truth map ``truth`` at ``threshold``.

    With ``G`` (from :func:`align_rotations` on the poses that made ``vol``) the map is first moved
    into the truth frame. With ``try_mirror`` the z-mirrored map is also scored and the better
    (smaller) resolution is returned, as the hand of an ab initio map is arbitrary.
    """
    v = torch.as_tensor(vol).to(torch.float64)
    t = torch.as_tensor(truth).to(torch.float64)
    if v.shape != t.shape:
        raise ValueError(f"map and truth map differ in shape: {tuple(v.shape)} vs {tuple(t.shape)}")
    if G is not None:
        v = align_map_to_truth(v, G, mirrored)
    candidates = [v, flip_hand(v)] if try_mirror else [v]
    best = math.inf
    for c in candidates:
        freq, curve = fsc(c, t)
        best = min(best, resolution_at(freq, curve, apix, threshold))
    return best
