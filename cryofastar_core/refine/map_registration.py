"""Registering one map onto another by a rotation and, optionally, a 3D offset and a change of hand.

Refinement keeps its two half sets apart (gold standard), so each half's poses are defined only up to
the frame of its own map. A global pass against a blurred starting map lets the two frames drift apart
by several degrees (measured in ``bench/README.md``, "Refinement from wherever the model lands": from
30° perturbations each half reached 2.5° in its own frame while the halves disagreed by about 7°), which
lowers their FSC, narrows the band refinement matches on, and blurs the summed map. Registering half 2
onto half 1 before every pass fixes the frame with six parameters (rotation and offset; and the hand
during global passes, where a half can settle in the mirror image), so the halves stay independent in
everything else.

The score is a whitened correlation of the two transforms over the shells up to a given radius (each
shell divided by its power, so the finer shells, which fix the angle, count as much as the coarse
ones); ``moving``'s transform is sampled at the rotated frequencies by trilinear interpolation on a
padded grid, as projections are (:func:`cryofastar_core.physics.projection.prepare_volume`). The search:
a ball of rotations about the identity (or a coarse SO(3) grid, both hands), then finer balls; the offset
as a phase ramp on a grid of 1 px, then 0.25 and 0.05 px, fitted before the rotation (a rotation about
an off-centre feature can mimic an offset) and again after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cryofastar_core.geometry import FLIP_Z, rotation_angle_deg, rotvec_to_matrix
from cryofastar_core.refine.global_pass import so3_grid
from cryofastar_core.physics.projection import prepare_volume, sample_ft
from cryofastar_core.refine.grids import ball_grid


@dataclass
class Registration:
    """``moving`` is in ``fixed``'s frame after ``out(w) = moving(G^T (w - t))`` (``mirrored``:
    ``moving(F G^T (w - t))``, ``F`` the z-mirror; ``t`` ``(3,)`` px as ``(x, y, z)``); poses ``R`` of
    particles behind ``moving`` become ``G R`` (``G F R F``), as :func:`cryofastar_core.evaluation.metrics.apply_alignment`,
    and their shifts ``s + (R'^T t)[:2]`` with ``R'`` the new pose (:meth:`shifts_for`).
    ``correlation``: of the registered maps; ``identity_correlation``: before; ``angle_deg``: the rotation
    angle of ``G``."""

    G: Tensor
    mirrored: bool
    correlation: float
    identity_correlation: float
    t: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    def shifts_for(self, R_new: Tensor, s: Tensor) -> Tensor:
        """Shifts ``(n, 2)`` px of particles with new poses ``R_new`` ``(n, 3, 3)`` and old shifts ``s``: the
        map moved by ``t`` moves each projection by the in-plane part of ``R_new^T t``, which the particle's
        shift (``physics/shift.py``'s sign: the one that centres the particle) takes up."""
        return shifts_after_moving_map(R_new, s, self.t)

    @property
    def angle_deg(self) -> float:
        return float(rotation_angle_deg(self.G[None], torch.eye(3, dtype=self.G.dtype)[None])[0])


def shifts_after_moving_map(R: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Shifts ``(n, 2)`` px of particles at poses ``R`` ``(n, 3, 3)`` with shifts ``s`` once their map has moved
    by ``t`` ``(3,)`` px (:func:`~cryofastar_core.physics.shift.shift_volume`): each projection moves by the
    in-plane part of ``R^T t``, which the particle's shift (the sign that centres it) takes up."""
    return s + (R.transpose(-1, -2) @ t.to(device=R.device, dtype=R.dtype))[:, :2]


def _vertex(minus: float, centre: float, plus: float) -> float:
    """Offset (in steps, within half a step) of the vertex of the parabola through three equally spaced
    scores; 0 unless the centre is a maximum."""
    curvature = minus - 2 * centre + plus
    if curvature >= 0 or centre < max(minus, plus):
        return 0.0
    return max(-0.5, min(0.5, 0.5 * (minus - plus) / curvature))


def register_map(moving: Tensor, fixed: Tensor, shells: float, *, radius_deg: float = 20.0,
                 coarse_step_deg: float | None = None, allow_mirror: bool = False,
                 shell_weights: Tensor | None = None, max_shift_px: float = 0.0, pad: int = 2,
                 chunk: int = 64) -> Registration:
    """The rotation (and hand) that best puts ``moving`` onto ``fixed``; both ``(D, D, D)``, same frame origin.

    Shells ``1 .. shells`` (of ``D``) are compared (see the module docstring), each weighted by
    ``shell_weights[shell]`` if given (e.g. the shells' signal-to-noise ratio from the half maps' FSC,
    ``FSC / (1 - FSC)``, so noisy shells of noisy maps do not pull the angle). The search:
    rotations within ``radius_deg`` of the identity (steps of a quarter of it), or, with
    ``coarse_step_deg``, every rotation of :func:`cryofastar_core.refine.global_pass.so3_grid` at that step plus
    the identity; then three balls of finer rotations about the best. Both hands with ``allow_mirror``.
    The identity is always a candidate, so a registration never scores below leaving the map alone.
    With ``max_shift_px`` > 0, a translation within that box is fitted after the rotation (a grid of
    1 px, then of 0.25 px and 0.05 px about the best), as a phase ramp on the rotated samples.
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
        src = torch.einsum("bij,pj->bpi", M.to(dev), pts).to(torch.float32) * (vft.padded_box / D)
        return sample_ft(vft, src[:, :, None, :])[:, :, 0]

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

    def ramp(t: Tensor) -> Tensor:
        """``exp(-2 pi i k.t / D)`` on the points: the transform of a map moved by ``t``."""
        return torch.exp(-2j * torch.pi * (pts @ t.to(dev)) / D).to(wb.dtype)

    def scores(G: Tensor, mirrored: bool, target: Tensor) -> Tensor:
        M = G.transpose(-1, -2)                                                     # out(w) = moving(G^T w)
        if mirrored:
            M = flip @ M
        out = [(sample(vols[0], M[a0:a0 + chunk]) * white_a * target).real.sum(-1) / norm
               for a0 in range(0, M.shape[0], chunk)]
        return torch.cat(out)

    def best_rotation(t: Tensor, first_search: bool, G: Tensor, mirrored: bool) -> tuple[float, Tensor, bool]:
        # The fixed map moved back by t stands for moving the rotated one by t.
        target = (wb * ramp(t).conj()).conj()
        if first_search:
            if coarse_step_deg is None:
                first = rotvec_to_matrix(torch.deg2rad(ball_grid(3, 4)[0].double() * (radius_deg / 4)))
            else:
                first = torch.cat([eye[None], so3_grid(coarse_step_deg)])
            best = (float(scores(eye[None], False, target)[0]), eye, False)
            for m in (False, True) if allow_mirror else (False,):
                sc = scores(first, m, target)
                k = int(sc.argmax())
                if float(sc[k]) > best[0]:
                    best = (float(sc[k]), first[k], m)
            score, G, mirrored = best
            step = radius_deg / 4 if coarse_step_deg is None else coarse_step_deg / 2
        else:
            score, step = float(scores(G[None], mirrored, target)[0]), 1.0
        for _ in range(3):
            step /= 3
            cand = rotvec_to_matrix(torch.deg2rad(ball_grid(3, 2)[0].double() * step)) @ G
            sc = scores(cand, mirrored, target)
            k = int(sc.argmax())
            if float(sc[k]) > score:
                score, G = float(sc[k]), cand[k]
        # As for the offset: a parabola's vertex along each axis of rotation, so G varies continuously.
        axes = torch.cat([-torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)]) * step
        sc = scores(rotvec_to_matrix(torch.deg2rad(axes)) @ G, mirrored, target)
        off = torch.tensor([_vertex(float(sc[a]), score, float(sc[a + 3])) for a in range(3)], dtype=torch.float64)
        return score, rotvec_to_matrix(torch.deg2rad(off * step)[None])[0] @ G, mirrored

    def best_translation(G: Tensor, mirrored: bool) -> tuple[float, Tensor]:
        M = G.transpose(-1, -2)[None]
        if mirrored:
            M = flip @ M
        cross = sample(vols[0], M)[0] * white_a * wb.conj() / norm                    # (P,)
        t, score, span, step = torch.zeros(3, dtype=torch.float64), -float("inf"), max_shift_px, 1.0
        for _ in range(3):
            g = torch.arange(-round(span / step), round(span / step) + 1, dtype=torch.float64) * step
            # exp(-2 pi i k.(t + g)/D) separates over the axes of the candidate grid: three factors.
            f = [torch.exp(-2j * torch.pi * (pts[:, a, None] * (t[a] + g).to(dev)[None]) / D).to(cross.dtype)
                 for a in range(3)]                                                     # 3 x (P, n)
            xy = (cross[:, None, None] * f[0][:, :, None] * f[1][:, None, :]).reshape(len(cross), -1)
            sc = (xy.T @ f[2]).real                                                     # (n * n, n)
            k = int(sc.argmax())
            n = len(g)
            score = float(sc.flatten()[k])
            at = (k // (n * n), (k // n) % n, k % n)
            t = t + torch.stack([g[i] for i in at])
            last, cube = step, sc.reshape(n, n, n)
            span, step = 2 * step, step / 4
        # The vertex of a parabola through the best point and its neighbours along each axis: the result
        # then moves continuously with the maps (a tie between grid points cannot flip it by a step).
        for a in range(3):
            if 0 < at[a] < n - 1:
                lo, hi = list(at), list(at)
                lo[a], hi[a] = at[a] - 1, at[a] + 1
                t[a] += last * _vertex(float(cube[tuple(lo)]), float(cube[at]), float(cube[tuple(hi)]))
        return score, t

    # A rotation about an off-centre feature can mimic a translation, so the translation is fitted first
    # (at the identity), then the rotation with it undone, then both again.
    identity = float(scores(eye[None], False, wb.conj())[0])
    t = best_translation(eye, False)[1] if max_shift_px > 0 else torch.zeros(3, dtype=torch.float64)
    score, G, mirrored = best_rotation(t, True, eye, False)
    for _ in range(2 if max_shift_px > 0 else 0):
        t_score, t_new = best_translation(G, mirrored)
        if t_score <= score:
            break
        t = t_new
        score, G, mirrored = best_rotation(t, False, G, mirrored)
    return Registration(G=G, mirrored=mirrored, correlation=score, identity_correlation=identity, t=t)
