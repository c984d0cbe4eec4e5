"""Registering one map onto another by a rotation (and, optionally, a change of hand).

Refinement keeps its two half sets apart (gold standard), so each half's poses are defined only up to
the frame of its own map. A global pass against a blurred starting map lets the two frames drift apart
by several degrees (measured in ``bench/README.md``, "Refinement from wherever the model lands": from
30° perturbations each half reached 2.5° in its own frame while the halves disagreed by about 7°), which
lowers their FSC, narrows the band refinement matches on, and blurs the summed map. Registering half 2
onto half 1 before every pass fixes the frame with three parameters (four with the hand), so the halves
stay independent in everything else.

The score is a whitened correlation of the two transforms over the shells up to a given radius (each
shell divided by its power, so the finer shells, which fix the angle, count as much as the coarse
ones); ``moving``'s transform is sampled at the rotated frequencies by trilinear interpolation on a
padded grid, as projections are (:func:`cryofastar_core.physics.projection.prepare_volume`). The search:
a ball of rotations about the identity (or a coarse SO(3) grid, both hands), then finer balls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from .geometry import FLIP_Z, rotation_angle_deg, rotvec_to_matrix
from .global_search import so3_grid
from .physics.projection import prepare_volume


@dataclass
class Registration:
    """``moving`` is in ``fixed``'s frame after ``out(w) = moving(G^T w)`` (``mirrored``: ``moving(F G^T w)``,
    ``F`` the z-mirror); poses ``R`` of particles behind ``moving`` become ``G R`` (``G F R F``), as
    :func:`cryofastar_core.metrics.apply_alignment`. ``correlation``: of the registered maps;
    ``identity_correlation``: before; ``angle_deg``: the rotation angle of ``G``."""

    G: Tensor
    mirrored: bool
    correlation: float
    identity_correlation: float

    @property
    def angle_deg(self) -> float:
        return float(rotation_angle_deg(self.G[None], torch.eye(3, dtype=self.G.dtype)[None])[0])


def _ball(radius_steps: int) -> Tensor:
    g = torch.arange(-radius_steps, radius_steps + 1, dtype=torch.float64)
    omega = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return omega[(omega ** 2).sum(-1) <= radius_steps ** 2 + 1e-9]


def register_map(moving: Tensor, fixed: Tensor, shells: float, *, radius_deg: float = 20.0,
                 coarse_step_deg: float | None = None, allow_mirror: bool = False,
                 shell_weights: Tensor | None = None, pad: int = 2, chunk: int = 64) -> Registration:
    """The rotation (and hand) that best puts ``moving`` onto ``fixed``; both ``(D, D, D)``, same frame origin.

    Shells ``1 .. shells`` (of ``D``) are compared (see the module docstring), each weighted by
    ``shell_weights[shell]`` if given (e.g. the shells' signal-to-noise ratio from the half maps' FSC,
    ``FSC / (1 - FSC)``, so noisy shells of noisy maps do not pull the angle). The search:
    rotations within ``radius_deg`` of the identity (steps of a quarter of it), or, with
    ``coarse_step_deg``, every rotation of :func:`cryofastar_core.global_search.so3_grid` at that step plus
    the identity; then three balls of finer rotations about the best. Both hands with ``allow_mirror``.
    The identity is always a candidate, so a registration never scores below leaving the map alone.
    """
    D = moving.shape[-1]
    flip = FLIP_Z.to(torch.float64)
    k = torch.arange(D, dtype=torch.float32) - D // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    radius = torch.sqrt(kx * kx + ky * ky + kz * kz)
    keep = (radius >= 0.5) & (radius <= shells)
    sh = torch.round(radius[keep]).long()
    # The lattice points turned by a fixed generic rotation, so that both maps are always sampled between
    # grid nodes: at the nodes themselves (the identity, otherwise) trilinear interpolation does not
    # smooth, and the identity would score differently from every other candidate.
    tilt = rotvec_to_matrix(torch.tensor([[0.31, -0.52, 0.67]], dtype=torch.float64))[0]
    pts = torch.stack([kx[keep], ky[keep], kz[keep]], -1).double() @ tilt.T                # (P, 3) (x, y, z)
    vols = [prepare_volume(m.to(torch.float32), pad=pad) for m in (moving, fixed)]
    dev = vols[0].ft.device
    pts, sh = pts.to(dev), sh.to(dev)
    eye = torch.eye(3, dtype=torch.float64)

    def sample(vft, M: Tensor) -> Tensor:
        """``vft`` at ``M[b] pts`` (frequencies in shells of ``D``): complex ``(B, P)``."""
        Dp = vft.padded_box
        channels = torch.view_as_real(vft.ft).permute(3, 0, 1, 2)[None]            # (1, 2, Dp, Dp, Dp) view
        src = torch.einsum("bij,pj->bpi", M.to(dev), pts).to(torch.float32) * (Dp / D)
        grid = (src * (2.0 / (Dp - 1)) + (2.0 * (Dp // 2) / (Dp - 1) - 1.0))[None, :, :, None, :]
        v = F_nn.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(v[0, 0, :, :, 0], v[0, 1, :, :, 0])

    def whitened(x: Tensor) -> Tensor:
        """Each shell divided by the root of its mean power, so every shell counts alike."""
        n_sh = int(sh.max()) + 1
        power = torch.zeros(n_sh, device=dev).index_add_(0, sh, x.abs() ** 2)
        count = torch.zeros(n_sh, device=dev).index_add_(0, sh, torch.ones_like(x.real))
        return 1.0 / torch.sqrt(power / count.clamp_min(1)).clamp_min(1e-30)[sh]

    b_pts = sample(vols[1], eye[None])[0]
    wb = b_pts * whitened(b_pts)
    if shell_weights is not None:
        sw = torch.zeros(int(sh.max()) + 1, device=dev)
        m = min(sw.numel(), shell_weights.numel())
        sw[:m] = shell_weights[:m].to(dev, torch.float32).clamp_min(0.0)
        wb = wb * sw[sh]
    a_pts = sample(vols[0], eye[None])[0]
    white_a = whitened(a_pts)
    # A rotation preserves the norm: divide by the unrotated maps' norms, the same for every candidate.
    norm = ((a_pts * white_a).abs().pow(2).sum().sqrt() * wb.abs().pow(2).sum().sqrt()).clamp_min(1e-30)

    def scores(G: Tensor, mirrored: bool) -> Tensor:
        M = G.transpose(-1, -2)                                                     # out(w) = moving(G^T w)
        if mirrored:
            M = flip @ M
        out = [(sample(vols[0], M[a0:a0 + chunk]) * white_a * wb.conj()).real.sum(-1) / norm
               for a0 in range(0, M.shape[0], chunk)]
        return torch.cat(out)

    if coarse_step_deg is None:
        step = radius_deg / 4
        first = rotvec_to_matrix(torch.deg2rad(_ball(4) * step))
    else:
        step = coarse_step_deg / 2
        first = torch.cat([eye[None], so3_grid(coarse_step_deg)])
    identity = float(scores(eye[None], False)[0])
    best = (identity, eye, False)
    for mirrored in (False, True) if allow_mirror else (False,):
        s = scores(first, mirrored)
        k = int(s.argmax())
        if float(s[k]) > best[0]:
            best = (float(s[k]), first[k], mirrored)
    score, G, mirrored = best
    fine = _ball(2)
    for _ in range(3):
        step /= 3
        cand = rotvec_to_matrix(torch.deg2rad(fine * step)) @ G
        s = scores(cand, mirrored)
        k = int(s.argmax())
        if float(s[k]) > score:
            score, G = float(s[k]), cand[k]
    return Registration(G=G, mirrored=mirrored, correlation=score, identity_correlation=identity)
