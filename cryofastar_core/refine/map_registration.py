"""Registering one map onto another by a rotation and, optionally, a 3D offset and a change of hand.

Refinement keeps its two half sets apart (gold standard), so each half's poses are defined only up to
the frame of its own map. A global pass against a blurred starting map lets the two frames drift apart
by several degrees (measured by ``bench/refine_benchmark.py``, ``bench/results/2026-12-06-refinement.md``), which
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


@dataclass(eq=False)
class _MapPair:
    """The two maps of one registration, sampled on the frequencies they are compared on, and the search's
    settings.

    ``pts`` ``(P, 3)`` float64: the lattice points of shells ``1 .. shells`` of ``D`` (``(x, y, z)``) turned
    by a fixed generic rotation; ``sh`` ``(P,)``: their shells. ``vols``: ``moving`` and ``fixed`` prepared
    for sampling (:func:`~cryofastar_core.physics.projection.prepare_volume`). ``white_a`` ``(P,)``:
    ``moving``'s per-shell whitening at the identity; ``wb`` ``(P,)`` complex: ``fixed``'s samples,
    whitened and shell-weighted; ``norm``: the score's normaliser (the same for every candidate).
    """

    box: int
    pts: Tensor
    sh: Tensor
    vols: list
    white_a: Tensor | None = None
    wb: Tensor | None = None
    norm: Tensor | None = None
    radius_deg: float = 20.0
    coarse_step_deg: float | None = None
    allow_mirror: bool = False
    chunk: int = 64

    @property
    def device(self) -> torch.device:
        return self.vols[0].ft.device


def _shell_points(D: int, shells: float) -> tuple[Tensor, Tensor]:
    """``(P, 3)`` float64 lattice points with ``0.5 <= |k| <= shells`` turned by a fixed rotation, and their
    shells ``(P,)`` int64, on the CPU."""
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
    return pts, sh


def _sample(pair: _MapPair, vft, M: Tensor) -> Tensor:
    """``vft`` at ``M[b] pts`` for ``M`` ``(B, 3, 3)`` (frequencies in shells of ``D``): complex ``(B, P)``."""
    src = torch.einsum("bij,pj->bpi", M.to(pair.device), pair.pts).to(torch.float32) * (vft.padded_box / pair.box)
    return sample_ft(vft, src[:, :, None, :])[:, :, 0]


def _whitening(sh: Tensor, x: Tensor) -> Tensor:
    """Per sample of ``x`` ``(P,)`` (shells ``sh`` ``(P,)``), one over the root of its shell's mean power, so
    every shell counts alike."""
    n_sh = int(sh.max()) + 1
    power = torch.zeros(n_sh, device=x.device).index_add_(0, sh, x.abs() ** 2)
    count = torch.zeros(n_sh, device=x.device).index_add_(0, sh, torch.ones_like(x.real))
    return 1.0 / torch.sqrt(power / count.clamp_min(1)).clamp_min(1e-30)[sh]


def _map_pair(moving: Tensor, fixed: Tensor, shells: float, shell_weights: Tensor | None, pad: int,
              **search) -> _MapPair:
    """Both maps ``(D, D, D)`` prepared and sampled at the identity: the whitened (and ``shell_weights``-ed)
    fixed samples, the moving map's whitening, and the normaliser of the score; ``search``: the settings
    :func:`register_map` passes on (``radius_deg``, ``coarse_step_deg``, ``allow_mirror``, ``chunk``)."""
    D = moving.shape[-1]
    pts, sh = _shell_points(D, shells)
    vols = [prepare_volume(m.to(torch.float32), pad=pad) for m in (moving, fixed)]
    dev = vols[0].ft.device
    pair = _MapPair(box=D, pts=pts.to(dev), sh=sh.to(dev), vols=vols, **search)
    eye = torch.eye(3, dtype=torch.float64)
    b_pts = _sample(pair, vols[1], eye[None])[0]
    wb = b_pts * _whitening(pair.sh, b_pts)
    if shell_weights is not None:
        sw = torch.zeros(int(pair.sh.max()) + 1, device=dev)
        m = min(sw.numel(), shell_weights.numel())
        sw[:m] = shell_weights[:m].to(dev, torch.float32).clamp_min(0.0)
        wb = wb * sw[pair.sh]
    a_pts = _sample(pair, vols[0], eye[None])[0]
    pair.white_a = _whitening(pair.sh, a_pts)
    pair.wb = wb
    # A rotation preserves the norm: divide by the unrotated maps' norms, the same for every candidate.
    pair.norm = ((a_pts * pair.white_a).abs().pow(2).sum().sqrt() * wb.abs().pow(2).sum().sqrt()).clamp_min(1e-30)
    return pair


def _ramp(pair: _MapPair, t: Tensor) -> Tensor:
    """``exp(-2 pi i k.t / D)`` ``(P,)`` on the points: the transform of a map moved by ``t`` ``(3,)`` px."""
    return torch.exp(-2j * torch.pi * (pair.pts @ t.to(pair.device)) / pair.box).to(pair.wb.dtype)


def _moving_frame(G: Tensor, mirrored: bool) -> Tensor:
    """Where to sample ``moving`` for the rotations ``G`` ``(B, 3, 3)``: ``out(w) = moving(G^T w)`` (``F G^T w``
    with ``F`` the z-mirror when ``mirrored``)."""
    M = G.transpose(-1, -2)
    return FLIP_Z.to(torch.float64) @ M if mirrored else M


def _scores(pair: _MapPair, G: Tensor, mirrored: bool, target: Tensor) -> Tensor:
    """Correlation ``(B,)`` of ``moving`` turned by each of ``G`` ``(B, 3, 3)`` with ``target`` ``(P,)``
    (the fixed samples, conjugated), ``chunk`` rotations at a time."""
    M = _moving_frame(G, mirrored)
    out = [(_sample(pair, pair.vols[0], M[a0:a0 + pair.chunk]) * pair.white_a * target).real.sum(-1) / pair.norm
           for a0 in range(0, M.shape[0], pair.chunk)]
    return torch.cat(out)


def _first_rotation(pair: _MapPair, target: Tensor) -> tuple[float, Tensor, bool, float]:
    """The best of the identity and the first candidates (a ball within ``radius_deg``, or the SO(3) grid;
    both hands with ``allow_mirror``): ``(score, G, mirrored, step_deg)``, with the step the finer search
    starts from."""
    eye = torch.eye(3, dtype=torch.float64)
    if pair.coarse_step_deg is None:
        first = rotvec_to_matrix(torch.deg2rad(ball_grid(3, 4)[0].double() * (pair.radius_deg / 4)))
    else:
        first = torch.cat([eye[None], so3_grid(pair.coarse_step_deg)])
    best = (float(_scores(pair, eye[None], False, target)[0]), eye, False)
    for m in (False, True) if pair.allow_mirror else (False,):
        sc = _scores(pair, first, m, target)
        k = int(sc.argmax())
        if float(sc[k]) > best[0]:
            best = (float(sc[k]), first[k], m)
    step = pair.radius_deg / 4 if pair.coarse_step_deg is None else pair.coarse_step_deg / 2
    return (*best, step)


def _finer_rotation(pair: _MapPair, target: Tensor, score: float, G: Tensor, mirrored: bool,
                    step: float) -> tuple[float, Tensor]:
    """Three balls of finer rotations about ``G`` (steps of a third each), then the vertex of a parabola
    along each axis: ``(score, G)``."""
    for _ in range(3):
        step /= 3
        cand = rotvec_to_matrix(torch.deg2rad(ball_grid(3, 2)[0].double() * step)) @ G
        sc = _scores(pair, cand, mirrored, target)
        k = int(sc.argmax())
        if float(sc[k]) > score:
            score, G = float(sc[k]), cand[k]
    # As for the offset: a parabola's vertex along each axis of rotation, so G varies continuously.
    axes = torch.cat([-torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)]) * step
    sc = _scores(pair, rotvec_to_matrix(torch.deg2rad(axes)) @ G, mirrored, target)
    off = torch.tensor([_vertex(float(sc[a]), score, float(sc[a + 3])) for a in range(3)], dtype=torch.float64)
    return score, rotvec_to_matrix(torch.deg2rad(off * step)[None])[0] @ G


def _best_rotation(pair: _MapPair, t: Tensor, first_search: bool, G: Tensor,
                   mirrored: bool) -> tuple[float, Tensor, bool]:
    """The rotation ``G`` ``(3, 3)`` (and hand) that best puts ``moving``, then moved by ``t`` ``(3,)`` px, onto
    ``fixed``: from the first candidates (``first_search``), or about the given ``G``: ``(score, G, mirrored)``."""
    # The fixed map moved back by t stands for moving the rotated one by t.
    target = (pair.wb * _ramp(pair, t).conj()).conj()
    if first_search:
        score, G, mirrored, step = _first_rotation(pair, target)
    else:
        score, step = float(_scores(pair, G[None], mirrored, target)[0]), 1.0
    score, G = _finer_rotation(pair, target, score, G, mirrored, step)
    return score, G, mirrored


def _best_translation(pair: _MapPair, G: Tensor, mirrored: bool, max_shift_px: float) -> tuple[float, Tensor]:
    """The offset ``t`` ``(3,)`` px within ``max_shift_px`` that best puts ``moving``, turned by ``G``, onto
    ``fixed``: grids of 1, 0.25 and 0.05 px, each about the last best, then a parabola's vertex per axis.
    Returns ``(score, t)``."""
    D, pts = pair.box, pair.pts
    moved = _sample(pair, pair.vols[0], _moving_frame(G[None], mirrored))[0]
    cross = moved * pair.white_a * pair.wb.conj() / pair.norm                          # (P,)
    t, score, span, step = torch.zeros(3, dtype=torch.float64), -float("inf"), max_shift_px, 1.0
    for _ in range(3):
        g = torch.arange(-round(span / step), round(span / step) + 1, dtype=torch.float64) * step
        # exp(-2 pi i k.(t + g)/D) separates over the axes of the candidate grid: three factors.
        f = [torch.exp(-2j * torch.pi * (pts[:, a, None] * (t[a] + g).to(pair.device)[None]) / D).to(cross.dtype)
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
    return score, t + last * _cube_vertex(cube, at)


def _cube_vertex(cube: Tensor, at: tuple[int, int, int]) -> Tensor:
    """Per axis, the vertex offset (in steps) of the parabola through ``cube[at]`` and its two neighbours
    along that axis (0 at the cube's edge), ``(3,)`` float64: the result then moves continuously with the
    maps (a tie between grid points cannot flip it by a step)."""
    off = torch.zeros(3, dtype=torch.float64)
    n = cube.shape[0]
    for a in range(3):
        if 0 < at[a] < n - 1:
            lo, hi = list(at), list(at)
            lo[a], hi[a] = at[a] - 1, at[a] + 1
            off[a] = _vertex(float(cube[tuple(lo)]), float(cube[at]), float(cube[tuple(hi)]))
    return off


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
    pair = _map_pair(moving, fixed, shells, shell_weights, pad, radius_deg=radius_deg,
                     coarse_step_deg=coarse_step_deg, allow_mirror=allow_mirror, chunk=chunk)
    eye = torch.eye(3, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64)
    # A rotation about an off-centre feature can mimic a translation, so the translation is fitted first
    # (at the identity), then the rotation with it undone, then both again.
    identity = float(_scores(pair, eye[None], False, pair.wb.conj())[0])
    if max_shift_px > 0:
        t = _best_translation(pair, eye, False, max_shift_px)[1]
    score, G, mirrored = _best_rotation(pair, t, True, eye, False)
    for _ in range(2 if max_shift_px > 0 else 0):
        t_score, t_new = _best_translation(pair, G, mirrored, max_shift_px)
        if t_score <= score:
            break
        t = t_new
        score, G, mirrored = _best_rotation(pair, t, False, G, mirrored)
    return Registration(G=G, mirrored=mirrored, correlation=score, identity_correlation=identity, t=t)


def self_match_scores(volume: Tensor, rotations: Tensor, shells: float, pad: int = 2, chunk: int = 64) -> Tensor:
    """How well ``volume`` ``(D, D, D)`` matches itself turned by each of ``rotations`` ``(B, 3, 3)``
    (``out(w) = volume(G^T w)``): the registration score ``(B,)`` over shells ``1 .. shells``, 1 at the
    identity. What :mod:`cryofastar_core.refine.mates` looks for a pseudo-symmetry with."""
    pair = _map_pair(volume, volume, shells, None, pad, chunk=chunk)
    return _scores(pair, rotations.to(torch.float64), False, pair.wb.conj())
