"""The passes of pose refinement, each a function of the shared :class:`~cryofastar_core.refine.state.RefineState`:
the starting maps (:func:`initial_maps`), the global passes over a rotation grid (:func:`global_search`),
and the local iterations on shrinking balls (:func:`local_iteration`). What each does and why is told in
:mod:`cryofastar_core.refine.driver`'s module docstring; one matching pass's reading, frame and sums are
in :mod:`cryofastar_core.refine.scan`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

import torch
from torch import Tensor

from cryofastar_core.geometry import rotvec_to_matrix
from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.fourier import fft2c
from cryofastar_core.refine.config import matching_shells, step_limited_shells
from cryofastar_core.refine.global_pass import best_on_grid, grid_projections, so3_grid
from cryofastar_core.refine.grids import ball_grid, parabola_vertex, shift_grid
from cryofastar_core.refine.junk import flag_junk, randomised_phases
from cryofastar_core.refine.matching import FourierBand, candidate_scores
from cryofastar_core.refine.scan import (HalfFrame, PassPlan, PassTally, band_fields, frame_fields, fsc_entry,
                                         fsc_filter, half_frame, moved_fields, record, run_matching_pass)
from cryofastar_core.refine.state import RefineState, prepared_reference, share


# --- The starting maps -------------------------------------------------------------------------------

def starting_scan(st: RefineState, insert: Callable[[np.ndarray, Tensor], None], stage: str) -> None:
    """This rank's part of a first reconstruction: every chunk's power into the whitening spectrum, and the
    chunk into the maps by ``insert(idx, images)`` at the starting poses (one class or several)."""
    done = 0
    for idx, imgs in st.chunks():
        st.spectrum.add(fft2c(imgs))
        insert(idx, imgs)
        done += len(idx)
        st.tick(stage, done)


def _first_power(st: RefineState) -> None:
    """This rank's first chunk's power into the whitening spectrum (see :func:`starting_power`)."""
    for _, imgs in st.chunks():
        st.spectrum.add(fft2c(imgs))
        break


def starting_power(st: RefineState) -> None:
    """The whitening power of the first pass when the caller gave the starting maps (no reconstruction to
    measure it in). One process whitens the first pass with its first chunk's power (see scan.on_band); ranks
    would each take a different chunk, so they take the power of every rank's first chunk, summed."""
    if st.distributed:
        st.on_every_rank(_first_power, st)
        share(st.comm, [st.spectrum.total, st.spectrum.count], st.device)


def initial_maps(st: RefineState, given: tuple[Tensor, Tensor] | None) -> None:
    """The half maps of the starting poses, reconstructed (one pass over the data), or the caller's
    ``given`` two ``(D, D, D)``; their FSC opens the history (``stage`` "start")."""
    if given is None:
        bps = st.new_backprojectors()
        st.on_every_rank(starting_scan, st, partial(st.insert_chunk, bps), "refine: initial reconstruction")
        st.end_pass(bps, st.spectrum)
        maps = [bp.finalize() for bp in bps]
    else:
        maps = [m.to(st.device, torch.float32) for m in given]
        bps = None
        starting_power(st)
    st.set_maps(maps, bps)
    st.history.append(fsc_entry(0, st.freq, st.curve, st.apix, "start", st.started))


# --- Global passes -----------------------------------------------------------------------------------

@dataclass(eq=False)
class _GlobalPlan(PassPlan):
    """A global pass's search: every rotation of ``grid`` ``(J, 3, 3)`` float64 CPU and shift offsets
    ``deltas`` ``(T, 2)`` px; ``refs`` the two prepared half-map references, ``projections`` their
    ``(J, P)`` projections on the band; ``E_here`` ``(P, T)`` the shift ramps and ``identity`` ``(1, 3, 3)``
    for scoring the current pose (``global_keep_better``)."""

    grid: Tensor
    deltas: Tensor
    refs: list
    projections: list[Tensor]
    E_here: Tensor
    identity: Tensor


def _global_plan(st: RefineState) -> _GlobalPlan:
    """The band (up to the FSC = 0.5 crossing, at most ``global_max_shells``), grid, references and half-2
    registration of the next global pass, from the current maps."""
    cfg, D, dev = st.cfg, st.box, st.device
    r_lim = min(matching_shells(st.freq, st.curve, D, cfg.first_fsc_threshold, cfg), cfg.global_max_shells)
    band = FourierBand(D, r_lim, dev)
    grid = so3_grid(cfg.global_step_deg)
    deltas = shift_grid(cfg.global_shift_step_px, cfg.global_shift_radius_px)
    refs = [prepared_reference(st, m, band) for m in st.maps]
    projections = [grid_projections(v, band, grid) for v in refs]
    E_here = band.ramps(deltas.to(dev), torch.float32).T.contiguous()                # (P, T)
    identity = torch.eye(3, dtype=torch.float64)[None]
    filt = fsc_filter(st.curve, band, cfg)
    frame = half_frame(st.maps, st.mask, r_lim, st.curve, cfg, cfg.global_step_deg)
    return _GlobalPlan(r_lim=r_lim, band=band, filt=filt, frame=frame, grid=grid, deltas=deltas, refs=refs,
                       projections=projections, E_here=E_here, identity=identity)


def _global_step(st: RefineState, plan: _GlobalPlan, k: int, X: Tensor, gi: Tensor, w: Tensor,
                 tally: PassTally) -> tuple[Tensor, Tensor]:
    """New poses ``(n, 3, 3)``, ``(n, 2)`` of the particles ``gi`` ``(n,)`` of half ``k`` (band transforms
    ``X`` ``(n, P)``, weight ``w`` ``(P,)``): the best grid rotation and shift offset."""
    ctf_k = st.ctf_of(gi)
    j, t, best = best_on_grid(plan.projections[k - 1], plan.band, X, st.s[gi], plan.deltas, w, ctf_k, st.apix)
    if tally.evidence is not None:
        # The grid's best, not the current pose's score: the particle sits in its own half map at its
        # current pose, which would lift its score above what the null (grid only) can reach.
        _record_evidence(st, plan, k, X, gi, w, ctf_k, best, tally)
    R_new, s_new = plan.grid[j.cpu()], st.s[gi] + plan.deltas[t.cpu()]
    if st.cfg.global_keep_better:
        # A pose already better than every grid point (a good feed-forward pose) is kept.
        here = candidate_scores(plan.refs[k - 1], plan.band, X, st.R[gi], st.s[gi], plan.identity,
                                plan.E_here, w, ctf_k, st.apix, st.cfg.batch_points)[:, 0]
        here_best, here_t = here.max(-1)
        stay = (here_best >= best).cpu()
        R_new = torch.where(stay[:, None, None], st.R[gi], R_new)
        s_new = torch.where(stay[:, None], st.s[gi] + plan.deltas[here_t.cpu()], s_new)
    tally.record(st.R[gi], R_new, st.s[gi], s_new, gi)
    return R_new, s_new


def _record_evidence(st: RefineState, plan: _GlobalPlan, k: int, X: Tensor, gi: Tensor, w: Tensor,
                     ctf_k: CTFParams | None, best: Tensor, tally: PassTally) -> None:
    """The particles' evidence (``best`` ``(n,)``, their best grid score) and, for every ``junk_null_every``-th
    particle, its phase-randomised copy's best grid score (:mod:`cryofastar_core.refine.junk`). Each copy's
    phases are drawn from its particle's own index, so any split into chunks and ranks draws the same."""
    tally.evidence.append(best.detach().double().cpu())
    null = torch.zeros(gi.shape[0], dtype=torch.float64)
    chosen = (gi % st.cfg.junk_null_every == 0)
    if bool(chosen.any()):
        pick = torch.nonzero(chosen).flatten()
        X_null = torch.cat([randomised_phases(X[int(i):int(i) + 1], torch.Generator().manual_seed(int(gi[i])))
                            for i in pick])
        ctf_null = None if ctf_k is None else ctf_k.index(pick.to(st.device))
        _, _, best_null = best_on_grid(plan.projections[k - 1], plan.band, X_null, st.s[gi[pick]], plan.deltas, w,
                                       ctf_null, st.apix)
        null[pick] = best_null.detach().double().cpu()
    tally.null.append(null)
    tally.null_mask.append(chosen.double())


def global_pass(st: RefineState, number: int) -> dict:
    """Global pass ``number`` (from 0): every particle to the best grid pose against its own half map, new
    maps from them; returns its history entry (with ``fraction_moved``, the share of poses that moved by
    more than half the grid step)."""
    cfg = st.cfg
    t0 = time.perf_counter()
    plan = _global_plan(st)
    tally = PassTally(evidence=[], null=[], null_mask=[]) if cfg.detect_junk else PassTally()
    values, _ = run_matching_pass(st, plan, _global_step, "refine: global search", tally)
    moved_deg, moved_px = values[:2]
    entry = fsc_entry(number + 1, st.freq, st.curve, st.apix, "global", t0)
    entry.update(angle_step_deg=float(cfg.global_step_deg), n_rotations=int(plan.grid.shape[0]),
                 n_shifts=int(plan.deltas.shape[0]), **band_fields(st, plan), **moved_fields(moved_deg, moved_px),
                 **frame_fields(plan.frame),
                 fraction_moved=_fraction_moved(st, moved_deg))
    if cfg.detect_junk:
        entry.update(junk=decide_junk(st, *values[2:]))
    record(st, entry)
    return entry


def _fraction_moved(st: RefineState, moved_deg: Tensor) -> float:
    """The share of the particles whose pose moved by more than half the grid step: what decides that the
    global passes have settled. Junk found by an earlier pass does not count (its best grid pose wanders)."""
    moved = moved_deg > st.cfg.global_step_deg / 2
    if st.junk is not None and bool((~st.junk).any()):
        moved = moved[~st.junk]
    return float(moved.double().mean())


def decide_junk(st: RefineState, evidence: Tensor, null: Tensor, null_mask: Tensor) -> dict:
    """This pass's junk decision from every particle's ``evidence`` ``(N,)`` and the null scores ``null``
    where ``null_mask`` ``(N,)`` is 1; kept in the state for the next pass's maps. Returns the rule for the
    history."""
    junk, z, rule = flag_junk(evidence, null[null_mask > 0], st.cfg.junk_min_bic_gain)
    if bool(junk.any()) and st.cfg.exclude_junk:
        st.bps = None  # this pass's maps hold the junk it found: the final maps are rebuilt if no pass follows
    st.junk, st.junk_score, st.junk_rule = junk, z, rule.to_dict()
    return st.junk_rule


def global_search(st: RefineState) -> None:
    """Global passes (none with ``global_step_deg`` ``None``), each against the previous one's maps, until
    fewer than ``global_settle_fraction`` of the poses move, at most ``global_passes``."""
    cfg = st.cfg
    for number in range(cfg.global_passes if cfg.global_step_deg is not None else 0):
        if global_pass(st, number)["fraction_moved"] < cfg.global_settle_fraction:
            break  # the assignment has settled within the grid: the local iterations take over


# --- Local iterations --------------------------------------------------------------------------------

@dataclass(eq=False)
class _LocalPlan(PassPlan):
    """A local iteration's search about each current pose: rotation offsets ``omegas`` ``(J, 3)`` rad
    (``perturb`` ``(J, 3, 3)`` float64 CPU, grid spacing ``angle_step`` deg) and shift offsets ``deltas``
    ``(T, 2)`` px (spacing ``shift_step``); ``E`` ``(P, T)`` their ramps; ``refs`` the two prepared half-map
    references; ``neighbours``/``soft_grids`` as :func:`best_candidate`; ``rot_at_edge`` ``(J,)``,
    ``shift_at_edge`` ``(T,)``: grid points missing a neighbour (the best score there may lie outside the
    searched region)."""

    angle_step: float
    angle_radius: float
    shift_step: float
    shift_radius: float
    omegas: Tensor
    deltas: Tensor
    perturb: Tensor
    E: Tensor
    refs: list
    neighbours: tuple[Tensor, Tensor] | None
    soft_grids: tuple[Tensor, Tensor] | None
    rot_at_edge: Tensor
    shift_at_edge: Tensor


def local_plan(st: RefineState, it: int, register: bool = True) -> _LocalPlan:
    """Local iteration ``it``'s (from 0) search: steps and radii shrunk by ``shrink ** it``, the band up to the
    FSC = 0.5 (first) or 0.143 (later) crossing, references and (``register``) half-2 registration from the
    current maps."""
    cfg, D, dev = st.cfg, st.box, st.device
    scale = cfg.shrink ** it
    a_step, a_rad = cfg.angle_step_deg * scale, cfg.angle_radius_deg * scale
    s_step, s_rad = cfg.shift_step_px * scale, cfg.shift_radius_px * scale
    thr = cfg.first_fsc_threshold if it == 0 else cfg.fsc_threshold
    r_lim = step_limited_shells(matching_shells(st.freq, st.curve, D, thr, cfg), a_step, cfg)
    band = FourierBand(D, r_lim, dev)
    g_rot, nb_rot = ball_grid(3, a_rad / a_step)
    g_sh, nb_sh = ball_grid(2, s_rad / s_step)
    omegas = torch.deg2rad(g_rot.double() * a_step)                      # (J, 3) rad
    deltas = g_sh.double() * s_step                                      # (T, 2) px
    nbs = (nb_rot.to(dev), nb_sh.to(dev)) if cfg.subgrid else None
    grids = (g_rot.to(dev, torch.float32), g_sh.to(dev, torch.float32)) if cfg.soft else None
    return _LocalPlan(
        r_lim=r_lim, band=band, angle_step=a_step, angle_radius=a_rad, shift_step=s_step, shift_radius=s_rad,
        omegas=omegas, deltas=deltas, perturb=rotvec_to_matrix(omegas), neighbours=nbs, soft_grids=grids,
        E=band.ramps(deltas.to(dev), torch.float32).T.contiguous(),
        refs=[prepared_reference(st, m, band) for m in st.maps],
        filt=fsc_filter(st.curve, band, cfg),
        frame=half_frame(st.maps, st.mask, r_lim, st.curve, cfg) if register else HalfFrame(None),
        rot_at_edge=(nb_rot < 0).any(-1).any(-1), shift_at_edge=(nb_sh < 0).any(-1).any(-1))


def _local_step(st: RefineState, plan: _LocalPlan, k: int, X: Tensor, gi: Tensor, w: Tensor,
                tally: PassTally) -> tuple[Tensor, Tensor]:
    """New poses ``(n, 3, 3)``, ``(n, 2)`` of the particles ``gi`` ``(n,)`` of half ``k`` (band transforms
    ``X`` ``(n, P)``, weight ``w`` ``(P,)``): the best offset about each current pose, composed in float64
    and re-orthonormalised so that repeated composition does not drift from SO(3)."""
    best_j, best_t, frac_r, frac_s = best_candidate(
        plan.refs[k - 1], plan.band, X, st.R[gi], st.s[gi], plan.perturb, plan.E, w, st.ctf_of(gi), st.apix,
        st.cfg.batch_points, plan.neighbours, plan.soft_grids)
    best_j, best_t = best_j.cpu(), best_t.cpu()
    omega = plan.omegas[best_j] + torch.deg2rad(frac_r.cpu().double() * plan.angle_step)
    R_new = st.R[gi] @ rotvec_to_matrix(omega)
    s_new = st.s[gi] + plan.deltas[best_t] + frac_s.cpu().double() * plan.shift_step
    tally.record(st.R[gi], R_new, st.s[gi], s_new, gi)
    tally.at_edge[0] += int(plan.rot_at_edge[best_j].sum())
    tally.at_edge[1] += int(plan.shift_at_edge[best_t].sum())
    return _orthonormalise(R_new), s_new


def local_iteration(st: RefineState, it: int) -> None:
    """Local iteration ``it`` (from 0): every particle to the best pose near its current one against its own
    half map, new maps from them, and a history entry."""
    cfg = st.cfg
    t0 = time.perf_counter()
    plan = local_plan(st, it)
    (moved_deg, moved_px), (edge_rot, edge_shift) = run_matching_pass(
        st, plan, _local_step, f"refine {it + 1}/{cfg.iterations}", PassTally(at_edge=[0, 0]))
    N = st.n
    entry = fsc_entry(it + 1, st.freq, st.curve, st.apix, "local", t0)
    entry.update(
        angle_step_deg=plan.angle_step, angle_radius_deg=plan.angle_radius, shift_step_px=plan.shift_step,
        shift_radius_px=plan.shift_radius, n_rotations=int(plan.omegas.shape[0]), n_shifts=int(plan.deltas.shape[0]),
        **band_fields(st, plan), **moved_fields(moved_deg, moved_px),
        fraction_rotation_at_edge=edge_rot / N, fraction_shift_at_edge=edge_shift / N, **frame_fields(plan.frame))
    record(st, entry)


def best_candidate(vft, band: FourierBand, X: Tensor, R: Tensor, s: Tensor, perturb: Tensor, E: Tensor, w: Tensor,
                   ctf: CTFParams | None, apix: float, batch_points: int,
                   neighbours: tuple[Tensor, Tensor] | None = None,
                   soft_grids: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best candidate per particle: indices into ``perturb`` ``(J, 3, 3)`` and into the shift grid, and the
    sub-grid offsets ``(n, 3)``, ``(n, 2)`` in grid steps (zeros without ``neighbours``).

    Arguments as :func:`candidate_scores`, plus ``neighbours``: ``(J, 3, 2)`` and ``(T, 2, 2)``
    grid-neighbour indices (see :func:`~cryofastar_core.refine.grids.ball_grid`) for the parabolic sub-grid
    peak; ``soft_grids``: the integer grids ``(J, 3)``, ``(T, 2)``: if given, the offsets instead move the
    best grid point to the posterior mean under weights ``exp(max(score, 0)^2)``.
    """
    score = candidate_scores(vft, band, X, R, s, perturb, E, w, ctf, apix, batch_points)
    n, J, T = score.shape
    dev = score.device
    flat = score.reshape(n, J * T).argmax(-1)
    j, t = flat // T, flat % T
    frac_r = torch.zeros(n, 3, device=dev)
    frac_s = torch.zeros(n, 2, device=dev)
    if soft_grids is not None:
        ll = score.clamp_min(0.0) ** 2
        p = torch.softmax(ll.reshape(n, J * T), -1).reshape(n, J, T)
        g_r, g_s = soft_grids
        frac_r = p.sum(2) @ g_r - g_r[j]
        frac_s = p.sum(1) @ g_s - g_s[t]
    elif neighbours is not None:
        rows = torch.arange(n, device=dev)
        s0 = score[rows, j, t]
        nb_r, nb_s = neighbours[0][j], neighbours[1][t]                # (n, 3, 2), (n, 2, 2)
        frac_r = _parabolic_peak(s0, nb_r, score[rows[:, None, None], nb_r.clamp_min(0), t[:, None, None]])
        frac_s = _parabolic_peak(s0, nb_s, score[rows[:, None, None], j[:, None, None], nb_s.clamp_min(0)])
    return j, t, frac_r, frac_s


def _parabolic_peak(s0: Tensor, nb: Tensor, sc: Tensor) -> Tensor:
    """Per-axis vertex of the parabola through the scores at ``-1, 0, +1`` grid steps, ``(m, ndim)`` in steps.

    ``s0`` ``(m,)``: score at the best point; ``nb`` ``(m, ndim, 2)``: neighbour indices (``-1``: none, then
    the offset is 0); ``sc`` ``(m, ndim, 2)``: the scores at ``nb`` (any value where there is none). Clamped
    to half a step, i.e. the point stays in the best grid cell.
    """
    off = parabola_vertex(sc[..., 0], s0[:, None], sc[..., 1])
    return torch.where((nb >= 0).all(-1), off, torch.zeros_like(off))


def _orthonormalise(R: Tensor) -> Tensor:
    """Nearest rotations (SVD polar factor) of ``(n, 3, 3)`` float64 matrices."""
    U, _, Vh = torch.linalg.svd(R)
    d = torch.sign(torch.linalg.det(U @ Vh))
    U = U.clone()
    U[:, :, -1] *= d[:, None]
    return U @ Vh
