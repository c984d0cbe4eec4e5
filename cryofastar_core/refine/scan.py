"""One matching pass over the data, as the global and the local passes both run it.

A pass reads this rank's particles chunk by chunk, matches each against its own half's reference on a
Fourier band (:mod:`cryofastar_core.refine.matching`), moves its pose, puts half 2's new poses into half
1's frame (:class:`HalfFrame`), and back-projects the chunk at the new poses into new half maps in the
same read. What differs between the global and the local pass is only how one half of a chunk gets its
new poses: a ``step`` function given a :class:`PassPlan` (:mod:`cryofastar_core.refine.passes`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.evaluation.metrics import apply_alignment
from cryofastar_core.geometry import rotation_angle_deg
from cryofastar_core.physics.fourier import fft2c
from cryofastar_core.reconstruct import Backprojector, resolution_at
from cryofastar_core.refine.config import RefineConfig
from cryofastar_core.refine.map_registration import Registration, register_map
from cryofastar_core.refine.matching import FourierBand, PowerSpectrum
from cryofastar_core.refine.state import RefineState

log = logging.getLogger(__name__)


class HalfFrame:
    """Puts half 2's new poses into half 1's frame (``G R``, shifts moved with the map's offset ``t``; see
    :mod:`cryofastar_core.refine.map_registration`) as they are made, so the next maps of both halves share one
    frame."""

    def __init__(self, reg: Registration | None):
        self.reg = reg

    @property
    def angle_deg(self) -> float:
        return 0.0 if self.reg is None else self.reg.angle_deg

    @property
    def offset_px(self) -> float:
        return 0.0 if self.reg is None else float(self.reg.t.norm())

    def __call__(self, k: int, R: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Poses ``R`` ``(n, 3, 3)``, shifts ``s`` ``(n, 2)`` of particles of half ``k``, in half 1's frame."""
        if k != 2 or self.reg is None:
            return R, s
        R_new = apply_alignment(R, self.reg.G, self.reg.mirrored)
        return R_new, self.reg.shifts_for(R_new, s)


def half_frame(maps: list[Tensor], mask: Tensor, shells: float, curve: Tensor, cfg: RefineConfig,
               coarse_step_deg: float | None = None) -> HalfFrame:
    """The rotation that registers half 2's map onto half 1's (identity without ``register_halves``);
    ``maps`` two ``(D, D, D)``, ``mask`` ``(D, D, D)``, ``curve`` ``(S,)`` their FSC, by which the shells are
    weighted (signal-to-noise ratio). Within ``register_radius_deg`` of the identity, or over all rotations
    (a grid of ``coarse_step_deg``): during the global passes the halves' frames can be any distance apart,
    and of either hand (from a blurred starting map a half can settle in the mirror image)."""
    if not cfg.register_halves:
        return HalfFrame(None)
    f = curve.to(torch.float64).clamp(0.0, 0.99)
    reg = register_map(maps[1] * mask, maps[0] * mask, shells, radius_deg=cfg.register_radius_deg,
                       coarse_step_deg=coarse_step_deg, allow_mirror=coarse_step_deg is not None,
                       shell_weights=f / (1 - f), max_shift_px=cfg.register_max_shift_px)
    return HalfFrame(reg)


@dataclass(eq=False)
class PassPlan:
    """What every matching pass sets up before reading: the matching radius ``r_lim`` (shells of ``D``), its
    ``band``, the per-sample FSC weight ``filt`` ``(P,)`` float64 and the half-2 ``frame``."""

    r_lim: float
    band: FourierBand
    filt: Tensor
    frame: HalfFrame


@dataclass(eq=False)
class PassTally:
    """What a matching pass records for the history, one tensor per half of a chunk: how far each pose
    turned (degrees) and moved (px), and which particles they are. ``at_edge`` (local passes): how many
    best rotations and shifts lay on the edge of the searched region."""

    moved_deg: list[Tensor] = field(default_factory=list)
    moved_px: list[Tensor] = field(default_factory=list)
    rows: list[Tensor] = field(default_factory=list)
    at_edge: list[int] | None = None
    # Global passes: each particle's evidence (the score of the pose it keeps) and, for every
    # junk_null_every-th particle, the score of its phase-randomised copy (null_mask 1 where scored).
    evidence: list[Tensor] | None = None
    null: list[Tensor] | None = None
    null_mask: list[Tensor] | None = None

    def record(self, R_old: Tensor, R_new: Tensor, s_old: Tensor, s_new: Tensor, rows: Tensor) -> None:
        """Particles ``rows`` ``(n,)`` go from ``R_old``, ``s_old`` to ``R_new`` ``(n, 3, 3)``, ``s_new`` ``(n, 2)``."""
        self.moved_deg.append(rotation_angle_deg(R_old, R_new))
        self.moved_px.append(torch.linalg.norm(s_new - s_old, dim=-1))
        self.rows.append(rows)

    def per_particle(self) -> tuple[list[Tensor], ...]:
        """The per-particle lists, in the order :func:`run_matching_pass` returns them."""
        extra = () if self.evidence is None else (self.evidence, self.null, self.null_mask)
        return (self.moved_deg, self.moved_px, *extra)


# step(state, plan, k, X, gi, w, tally) -> (R_new, s_new): the new poses of the particles gi of half k, whose
# band transforms are X (n, P), under the matched filter's weight w (P,); records them in the tally.
Step = Callable[[RefineState, PassPlan, int, Tensor, Tensor, Tensor, PassTally], tuple[Tensor, Tensor]]


def fsc_filter(curve: Tensor, band: FourierBand, cfg: RefineConfig) -> Tensor:
    """Per band sample, ``max(FSC, 0)`` of its shell (ones without ``fsc_weighting``), float64 ``(P,)``."""
    filt = torch.ones(band.shell.shape, dtype=torch.float64, device=band.shell.device)
    if cfg.fsc_weighting:
        filt = filt * curve.to(filt.device)[band.shell.clamp(max=curve.numel() - 1)].clamp(0.0, 1.0)
    return filt


def match_weight(filt: Tensor, spectrum: PowerSpectrum, band: FourierBand, cfg: RefineConfig) -> Tensor:
    """The matched filter's weight per band sample ``(P,)`` float32: FSC weight over noise power (when whitening)."""
    if cfg.whiten and spectrum.ready():
        filt = filt / spectrum.mean()[band.shell].clamp_min(1e-30)
    return filt.to(torch.float32)


def on_band(chunks: Iterator[tuple[np.ndarray, Tensor]], band: FourierBand, filt: Tensor, spectrum: PowerSpectrum,
            next_spectrum: PowerSpectrum, cfg: RefineConfig) -> Iterator[tuple[np.ndarray, Tensor, Tensor, Tensor]]:
    """``(idx, images, X, w)`` per chunk: ``X`` ``(n, P)`` the image transforms on ``band``, ``w`` ``(P,)`` the
    matched filter's weight. The images' power goes into ``next_spectrum`` (the next pass's whitening), and into
    ``spectrum`` too while it is empty (the caller gave the starting half maps: the first chunk's is used)."""
    for idx, imgs in chunks:
        ft = fft2c(imgs)
        next_spectrum.add(ft)
        if not spectrum.ready():
            spectrum.add(ft)
        yield idx, imgs, ft.reshape(ft.shape[0], -1)[:, band.idx_full], match_weight(filt, spectrum, band, cfg)


def by_half(half: Tensor, idx: np.ndarray) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(k, sel, gi)`` for each half set ``k`` present in the chunk ``idx``: positions in the chunk and
    global indices of its particles, so each half is matched only against its own map."""
    for k in (1, 2):
        sel = torch.nonzero(half[idx] == k).flatten()
        if sel.numel():
            yield k, sel, torch.as_tensor(idx)[sel]


def matching_scan(st: RefineState, plan: PassPlan, step: Step, stage: str, new_bps: list[Backprojector],
                  next_spectrum: PowerSpectrum, tally: PassTally, sets: Tensor | None = None) -> None:
    """This rank's part of a pass: every chunk matched (``step``, per half), its new poses put into the
    shared frame and stored in ``st``, and the chunk inserted at them into ``new_bps`` (by half, or by
    ``sets``: :meth:`RefineState.insert_chunk`)."""
    done = 0
    for idx, imgs, X, w in on_band(st.chunks(), plan.band, plan.filt, st.spectrum, next_spectrum, st.cfg):
        for k, sel, gi in by_half(st.half, idx):
            R_new, s_new = step(st, plan, k, X[sel.to(st.device)], gi, w, tally)
            st.R[gi], st.s[gi] = plan.frame(k, R_new, s_new)
        st.insert_chunk(new_bps, idx, imgs, sets)
        done += len(idx)
        st.tick(stage, done)


def run_matching_pass(st: RefineState, plan: PassPlan, step: Step, stage: str,
                      tally: PassTally, sets: Tensor | None = None) -> tuple[list[Tensor], list[int]]:
    """One pass over the data on every rank, then its sums shared and its maps made the current ones; with
    ``sets`` (:func:`~cryofastar_core.refine.state.subsets`) the sub-half maps too
    (:meth:`RefineState.set_subset_maps`).

    Returns the tally's per-particle values (:meth:`PassTally.per_particle`: how far the poses turned,
    degrees, and moved, px; in global passes also the evidence, null scores and null mask), each ``(N,)``
    indexed by particle, and the tally's ``at_edge`` counts summed over the ranks.
    """
    next_spectrum = PowerSpectrum(st.box, st.device)
    new_bps = st.new_backprojectors(2 if sets is None else 4)
    st.on_every_rank(matching_scan, st, plan, step, stage, new_bps, next_spectrum, tally, sets)
    values, counts = st.end_pass(new_bps, next_spectrum, tally.rows, tally.per_particle(),
                                 tuple(tally.at_edge or ()))
    st.spectrum = next_spectrum
    if sets is None:
        st.set_maps([bp.finalize() for bp in new_bps], new_bps)
    else:
        st.set_subset_maps(new_bps)
    return values, counts


def fsc_entry(iteration: int, freq: Tensor, curve: Tensor, apix: float, stage: str, t0: float) -> dict:
    """The history entry's start: stage, iteration, seconds since ``t0``, resolutions and the FSC ``curve``."""
    return dict(stage=stage, iteration=iteration, seconds=round(time.perf_counter() - t0, 3),
                resolution_0143=float(resolution_at(freq, curve, apix, 0.143)),
                resolution_05=float(resolution_at(freq, curve, apix, 0.5)),
                fsc=[round(float(v), 5) for v in curve.cpu()])


def band_fields(st: RefineState, plan: PassPlan) -> dict:
    """The history's account of the matching band: radius (shells), resolution (Å) and cropped box."""
    return dict(match_shells=plan.r_lim, match_resolution=float(st.box * st.apix / plan.r_lim),
                match_box=plan.band.crop)


def moved_fields(moved_deg: Tensor, moved_px: Tensor) -> dict:
    """The history's account of how far the poses moved: ``moved_deg``, ``moved_px`` ``(N,)``."""
    return dict(median_rotation_change_deg=float(moved_deg.median()),
                mean_rotation_change_deg=float(moved_deg.mean()), median_shift_change_px=float(moved_px.median()))


def frame_fields(frame: HalfFrame) -> dict:
    """The history's account of the half-2 registration the pass applied."""
    return dict(half2_registration_deg=frame.angle_deg, half2_registration_px=frame.offset_px)


def record(st: RefineState, entry: dict) -> None:
    """Append a pass's ``entry`` to the history, log it, and show the caller the poses it produced."""
    st.history.append(entry)
    name = {"global": "global pass", "mates": "mate pass"}.get(entry["stage"], "local iteration")
    junk = entry.get("junk")
    flagged = f", {junk['n_flagged']} particles without evidence for any pose (junk)" if (junk or {}).get("n_flagged") else ""
    log.info("refinement %s %d: poses moved %.1f deg (median), half-map FSC 0.143 at %.1f Å, %.1f s%s", name,
             entry["iteration"], entry["median_rotation_change_deg"], entry["resolution_0143"], entry["seconds"],
             flagged)
    if st.on_stage:
        st.on_stage(entry, st.R, st.s)
