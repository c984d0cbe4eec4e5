"""Pose mates of a pseudo-symmetric structure: every particle chooses between its pose and its mate.

Many proteins are nearly symmetric (a homodimer, a domain repeat): turned by 180° about some axis, the
map matches itself at low resolution and differs only in finer detail. The global passes assign poses at
low resolution (``global_max_shells``), where a pose and its mate ``S R`` look alike, and local searches
cannot cross 180°; so particles split between the two, the maps become a blend, the blend is symmetric
enough to keep the split, and the fine detail that tells the halves of the structure apart is averaged
away (6FLR: half of the particles at the mate in every run, the map up to 21 % coarser than the true
poses give; ``bench/results/2026-12-06-scale.md``).

Before the last local iteration (which then refines the chosen poses and shifts): the mate is the half turn
and offset that best match half 1's map onto itself (:func:`find_mate`). Then mate passes: each particle is
scored at its pose and at ``S R`` over the last local iteration's band against the map of the other
sub-half of its half set (not a map that holds its own image; the two sub-halves in turn), keeps the
better, and the maps are rebuilt from the choices (gold standard as every pass). A blend map is not
exactly symmetric (the halves never split exactly evenly), and each pass sharpens whichever way it leans,
so the split resolves in a few passes; on a structure without such a mate the passes keep nearly every
pose and stop once each sub-half has had a quiet pass. Each half resolves on its own, possibly towards the other side: if half 2's
map then matches half 1's better turned by ``S``, half 2's particles all take their mates in one more pass.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from cryofastar_core.evaluation.metrics import resample_volume, rotate_volume
from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.refine.map_registration import register_map, self_match_scores, shifts_after_moving_map
from cryofastar_core.refine.matching import candidate_scores
from cryofastar_core.refine.passes import local_plan
from cryofastar_core.refine.scan import (PassTally, band_fields, frame_fields, fsc_entry, moved_fields, record,
                                         run_matching_pass)
from cryofastar_core.refine.state import RefineState, prepared_reference, sub_half, subsets

COARSE_AXIS_STEP_DEG = 3.0
COARSE_SHELLS = 12.0
COARSE_CANDIDATES = 3
REGISTER_SHELLS = 20.0   # the offset and fine angle need no finer shells, and each costs
MATE_PASSES = 8          # what the job asks for (RefineConfig.mate_passes); 6FLR resolved in 7


def half_turns(axes: Tensor) -> Tensor:
    """The 180° rotations ``2 n n^T - I`` ``(B, 3, 3)`` about unit axes ``(B, 3)``."""
    n = axes / axes.norm(dim=-1, keepdim=True)
    return 2 * n[:, :, None] * n[:, None, :] - torch.eye(3, dtype=n.dtype)


def hemisphere_axes(step_deg: float) -> Tensor:
    """Unit axes ``(B, 3)`` float64 about ``step_deg`` apart covering the upper hemisphere (a Fibonacci
    lattice; an axis and its opposite give the same half turn)."""
    n = max(8, int(2 * math.pi / math.radians(step_deg) ** 2))
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - i / n                                   # uniform in z on [0, 1]: equal areas
    phi = i * math.pi * (3 - math.sqrt(5))
    r = torch.sqrt(1 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def _axes_near(axis: Tensor, radius_deg: float, step_deg: float) -> Tensor:
    """Axes within ``radius_deg`` of ``axis`` ``(3,)`` on a grid of ``step_deg`` (tangent-plane offsets)."""
    a = axis / axis.norm()
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=a.dtype) if abs(float(a[0])) < 0.9 else torch.tensor([0.0, 1.0, 0.0], dtype=a.dtype)
    u = torch.linalg.cross(a, helper)
    u = u / u.norm()
    v = torch.linalg.cross(a, u)
    k = int(radius_deg // step_deg)
    g = torch.arange(-k, k + 1, dtype=a.dtype) * math.radians(step_deg)
    gu, gv = torch.meshgrid(g, g, indexing="ij")
    keep = gu ** 2 + gv ** 2 <= math.radians(radius_deg) ** 2 + 1e-12
    return a + gu[keep, None] * u + gv[keep, None] * v


def find_mate(volume: Tensor, shells: float, pad: int = 2, max_shift_px: float = 3.0) -> tuple[Tensor, Tensor, float]:
    """The mate of ``volume`` ``(D, D, D)``: ``(A, t, score)`` with ``A`` ``(3, 3)`` float64 close to a half
    turn and ``t`` ``(3,)`` px such that ``volume(A^T (w - t))`` best matches ``volume(w)``, and that
    match's score (1 for an exact symmetry). Half turns on a hemisphere of axes ``COARSE_AXIS_STEP_DEG``
    apart over the first ``COARSE_SHELLS`` shells (an axis off the box centre costs little there), then 0.5°
    about the best; then rotation and offset refined together on ``shells``, as half 2 is registered onto
    half 1 (the axis of a pseudo-symmetry need not pass through the box centre). The search runs on the
    map moved so that its centre of mass sits at the box centre, which the axis of a pseudo-symmetric
    assembly passes near (an axis far off the centre would decorrelate the coarse shells)."""
    c = volume_centroid(volume)
    A, t_c, score = _mate_about_centre(shift_volume(volume, -c).to(volume.dtype), shells, pad, max_shift_px)
    # volume(w) = centred(w - c): the mate of the centred map, moved back
    return A, c + t_c - A @ c, score


def _mate_about_centre(volume: Tensor, shells: float, pad: int, max_shift_px: float) -> tuple[Tensor, Tensor, float]:
    # several candidate axes from the coarse shells (an offset left by the centring still costs there),
    # each registered with rotation and offset on every shell
    coarse_shells = min(shells, COARSE_SHELLS)
    axes = hemisphere_axes(COARSE_AXIS_STEP_DEG)
    coarse = self_match_scores(volume, half_turns(axes), coarse_shells, pad)
    best = None
    for k in _distinct_best(axes, coarse, COARSE_CANDIDATES):
        near = _axes_near(axes[k], COARSE_AXIS_STEP_DEG, 0.5)
        S = half_turns(near[int(self_match_scores(volume, half_turns(near), coarse_shells, pad).argmax())][None])[0]
        reg = register_map(rotate_volume(volume, S), volume,
                           min(shells, REGISTER_SHELLS), radius_deg=2.0,
                           max_shift_px=max_shift_px, pad=pad)
        if best is None or reg.correlation > best[2]:
            best = (reg.G @ S, reg.t, reg.correlation)
    return best


def _distinct_best(axes: Tensor, scores: Tensor, k: int, apart_deg: float = 10.0) -> list[int]:
    """The ``k`` best-scoring axes at least ``apart_deg`` from each other (an axis and its opposite alike)."""
    chosen: list[int] = []
    for i in scores.argsort(descending=True).tolist():
        if all(float((axes[i] @ axes[j]).abs()) < math.cos(math.radians(apart_deg)) for j in chosen):
            chosen.append(i)
            if len(chosen) == k:
                break
    return chosen


def resolve_mates(st: RefineState) -> None:
    """The mate passes of the module docstring, on the band of the last local iteration (nothing without
    local iterations)."""
    cfg = st.cfg
    if cfg.mate_passes <= 0 or cfg.iterations <= 0:
        return
    plan = local_plan(st, cfg.iterations - 1, register=False)
    mate = find_mate(st.maps[0] * st.mask, plan.r_lim, cfg.pad)
    sets = subsets(st.half)
    _subset_maps(st, sets)
    settled = 0
    for i in range(cfg.mate_passes):
        flipped = _mate_pass(st, mate, i, "choose", sets)
        settled = settled + 1 if flipped <= cfg.mate_settle_fraction * st.n else 0
        if settled == 2:    # both sub-halves chose and kept their poses
            break
    # Each half resolved on its own, perhaps to opposite sides: then half 2 moved by the mate matches half 1
    # far better than as it is (as well as the halves match, against as well as the mates do). Judged once the
    # passes have settled, whether they resolved a split or found each half already on one side (a 3HSY
    # draw at SNR 0.1 came out of its global passes that way: tests/test_refine_mates.py), with a margin:
    # between two blends the difference is noise.
    A, t, score = mate
    half1, half2 = st.maps[0] * st.mask, st.maps[1] * st.mask
    resolved = flipped <= cfg.mate_settle_fraction * st.n
    turned = resample_volume(half2, A.T, t)                          # half2(A^T (w - t))
    if resolved and _correlation(turned, half1) > _correlation(half2, half1) + 0.25 * (1 - score):
        _mate_pass(st, mate, cfg.mate_passes, "half 2 to its mates")
    st.subset_maps = None   # the passes that follow do not keep them


def _subset_maps(st: RefineState, sets: Tensor) -> None:
    """The sub-half maps of the current poses (one pass over the data; ``sets``: :func:`~.state.subsets`),
    for the first mate pass to score against."""
    bps = st.new_backprojectors(4)
    st.on_every_rank(st.insert_all, bps, sets)
    st.end_pass(bps, None)
    st.subset_maps = [bp.finalize() for bp in bps]


def _correlation(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _mate_pass(st: RefineState, mate: tuple[Tensor, Tensor, float], i: int, mode: str,
               sets: Tensor | None = None) -> int:
    """One pass: every particle at its pose or its mate (``A R``, the shift taking up the offset ``t``;
    ``mode`` "choose": each particle of sub-half ``i mod 2`` the better against the map of the other sub-half
    of its half set, ``sets`` (:func:`~.state.subsets`), whose maps the pass makes for the next; otherwise
    half 2's particles all take their mates); returns how many changed.

    Not against its own half map: a particle is in that map at its current pose and not at its mate, and at a
    few thousand particles that self-match outweighed what tells a pose from its mate, so a blend stayed a
    blend (6FLR, 2,000 at SNR 0.1: two of 2,000 changed; bench/results/2026-12-06-class-averages.md, session
    20). The sub-halves choose in turn: choosing at once, each followed the other's lean and they swapped
    sides pass after pass."""
    A, t, score = mate
    turn = i % 2   # the sub-half that chooses in this pass
    t0 = time.perf_counter()
    # A mate pass chooses between two poses of each particle against a map of its own half; it does not move
    # the frames, so half 2 is not registered again (most of a pass's time: py-spy on 6FLR 10,000 x 128);
    # the last local iteration registers it.
    plan = local_plan(st, st.cfg.iterations - 1, register=False)
    zero = int((plan.deltas.abs().sum(-1)).argmin())
    E0, eye = plan.E[:, zero:zero + 1].contiguous(), torch.eye(3, dtype=torch.float64)[None]

    def step(st: RefineState, plan, k: int, X: Tensor, gi: Tensor, w: Tensor, tally: PassTally):
        R, s = st.R[gi], st.s[gi]
        mates = A @ R
        s_mates = shifts_after_moving_map(mates, s, t)
        if mode == "choose":
            take = torch.zeros(len(gi), dtype=torch.bool)
            m = sub_half(gi) == turn
            if bool(m.any()):
                ref, g, Xm = refs[2 * (k - 1) + 1 - turn], gi[m], X[m.to(X.device)]
                same = candidate_scores(ref, plan.band, Xm, R[m], s[m], eye, E0, w, st.ctf_of(g), st.apix,
                                        st.cfg.batch_points)
                other = candidate_scores(ref, plan.band, Xm, mates[m], s_mates[m], eye, E0, w, st.ctf_of(g),
                                         st.apix, st.cfg.batch_points)
                take[m] = (other[:, 0, 0] > same[:, 0, 0]).cpu()
        else:
            take = torch.full((len(gi),), k == 2)
        R_new = torch.where(take[:, None, None], mates, R)
        s_new = torch.where(take[:, None], s_mates, s)
        tally.record(R, R_new, s, s_new, gi)
        return R_new, s_new

    refs = [prepared_reference(st, m, plan.band) for m in st.subset_maps] if mode == "choose" else []
    (moved_deg, moved_px), _ = run_matching_pass(st, plan, step, f"mates {i + 1}", PassTally(at_edge=[0, 0]),
                                                 sets if mode == "choose" else None)
    flipped = int((moved_deg > 90).sum())
    choosing = int((sub_half(torch.arange(st.n)) == turn).sum()) if mode == "choose" else st.n
    entry = fsc_entry(i + 1, st.freq, st.curve, st.apix, "mates", t0)
    entry.update(mode=mode, mate_score=score, n_flipped=flipped, flipped_fraction=flipped / max(choosing, 1),
                 **band_fields(st, plan),
                 **moved_fields(moved_deg, moved_px), **frame_fields(plan.frame))
    record(st, entry)
    return flipped
