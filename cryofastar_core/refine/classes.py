"""Several classes in one ab initio: ``K`` pairs of half maps refined side by side, each particle weighted
into the classes by how well it matches each (issue 24).

Why: a particle set that holds two conformations (or junk made of another protein) gives one blurred map
in one class; CryoSPARC's ab initio is run with several classes for this reason, and RELION users classify
in 3D. With ``K`` classes each conformation can build its own map, and a class that wins few particles is
a sink the user discards.

How (:func:`classify_poses`), from poses that fit a consensus map (the job's one-class global passes):

1. **Start.** Every particle is scored over the rotation grid against the one-class map at the starting
   poses, and the particles are ranked, within each half set, by how sharply their best rotation stands
   out (:func:`~cryofastar_core.refine.global_pass.peak_over_spread`): the best-fitting ``K``-th start class
   1, the worst-fitting ``K``-th class ``K`` (``class_start`` "fit"; "dealt" deals them at random, balanced
   over the half sets). Each class's maps are reconstructed at the starting poses. Dealt, the classes start
   almost alike and differ only in which particles built them; ranked, particles of a structure the
   consensus does not fit start together.
2. **Global passes with assignment.** In every class, each particle's pose is searched as in the one-class
   global pass (:mod:`cryofastar_core.refine.passes`: every rotation of the grid and shift offset against
   its own half's map of that class, the current pose kept where it scores higher), and its probability of
   belonging to each class is ``softmax(max(score, 0)^2 / 2)`` over the classes (the matched filter's
   log-likelihood; one band and one weight common to all classes, so the scores compare). It is inserted
   into every class at its pose there, weighted by that probability. A class's map becomes more like the
   particles that prefer it, so the classes drift apart, as in RELION's 3D classification from one
   reference with random subsets.
3. The passes repeat, each against the previous one's maps, until fewer than ``global_settle_fraction`` of
   the particles change their most probable class or move by more than half the grid step, at most
   ``global_passes``.

Three things it needs that one class does not, each found by measurement (two blob volumes, box 32):

* **No self-match.** A particle's class is chosen by its score against a map that does not hold its own
  image: each half set is split into two sub-halves (a hash of the index), and a particle is scored
  against its class's map of the *other* sub-half of its own half. With its own image in the map, a
  particle matches its own noise, and that outweighed what tells the classes apart: from the true poses
  at SNR 10, every particle stayed in the class it was dealt (half of them wrong). Poses are still
  searched against the whole half map, as with one class.
* **One meaning of a class label in every half and sub-half.** The two halves (and within each, the two
  sub-halves) are classified apart, so nothing else ties half 2's class 0 to half 1's: after every pass
  each sub-half's classes are matched to the first sub-half's by correlation (same frame), and half 2's
  to half 1's by registering every pair of class maps (all rotations, both hands); the best permutation
  relabels particles, poses and maps.
* **Poses that fit a consensus first.** From random poses the classes do not converge (poses and classes
  each wait for the other); from poses that fit a consensus map of two conformations they separate. The
  job therefore runs its one-class global passes first. What it gives: ``tests/test_classes.py``,
  ``bench/junk_benchmark.py``.

**Gold standard.** A particle of half ``h`` is compared only with half-``h`` maps and inserted only into
half-``h`` maps: within every class the two halves stay independent.

**Junk.** Each particle's evidence is its best grid score over every class; every ``junk_null_every``-th
particle is scored again with its phases randomised, and :func:`~cryofastar_core.refine.junk.flag_junk`
decides as with one class. Junk leaves every class's maps from the next pass on (``exclude_junk``).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.reconstruct import Backprojector, fsc, insert_half_sets, resolution_at
from cryofastar_core.refine.config import RefineConfig, matching_shells
from cryofastar_core.refine.global_pass import best_on_grid, grid_projections, peak_over_spread, so3_grid
from cryofastar_core.refine.grids import shift_grid
from cryofastar_core.refine.junk import randomised_phases
from cryofastar_core.refine.map_registration import register_map
from cryofastar_core.refine.matching import FourierBand, PowerSpectrum, candidate_scores
from cryofastar_core.refine.passes import decide_junk, starting_power, starting_scan
from cryofastar_core.refine.scan import HalfFrame, PassTally, by_half, fsc_filter, half_frame, moved_fields, on_band
from cryofastar_core.refine.state import RefineState, prepared_reference, share, start_state, sub_half
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)

# A particle is inserted into a class only where its probability there is above this: below, it adds nothing
# a map can show, and costs an insertion.
MIN_PROBABILITY = 1e-3
# Every permutation of the labels is tried when matching halves (_best_permutation): 8! = 40,320.
MAX_CLASSES = 8


@dataclass
class ClassResult:
    """Output of :func:`classify_poses`.

    ``labels`` ``(N,)`` int64 in ``0..K-1``: each particle's class; ``rotations`` ``(N, 3, 3)``, ``shifts``
    ``(N, 2)``: its pose in its class's frame (float64, CPU); ``probabilities`` ``(N, K)``: how
    probable each class is for it; ``maps``: per class its two half maps
    ``(D, D, D)`` (unmasked; without the junk when ``exclude_junk``); ``history``: one dict per pass
    (``stage`` "classes"); ``junk``, ``junk_score``, ``junk_rule`` as
    :class:`~cryofastar_core.refine.driver.RefineResult`'s."""

    labels: Tensor
    rotations: Tensor
    shifts: Tensor
    probabilities: Tensor
    maps: list[tuple[Tensor, Tensor]]
    history: list[dict] = field(default_factory=list)
    junk: Tensor | None = None
    junk_score: Tensor | None = None
    junk_rule: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Classes:
    """The classes during a run: each particle's pose in every class's frame, ``R`` ``(K, N, 3, 3)`` and
    ``s`` ``(K, N, 2)`` (float64, CPU), its class probabilities ``prob`` ``(N, K)``; per class its half maps
    and their masked FSC ``curves`` (on ``freq``)."""

    R: Tensor
    s: Tensor
    prob: Tensor
    maps: list[list[Tensor]] = field(default_factory=list)
    sub_maps: list[list[list[Tensor]]] = field(default_factory=list)  # [class][half][sub]: see _sub
    curves: list[Tensor] = field(default_factory=list)
    freq: Tensor | None = None

    @property
    def k(self) -> int:
        return self.prob.shape[1]

    @property
    def labels(self) -> Tensor:
        """Each particle's most probable class ``(N,)`` int64."""
        return self.prob.argmax(1)

    def set_maps(self, maps: list[list[Tensor]], mask: Tensor, sub_maps: list[list[list[Tensor]]] | None = None) -> None:
        self.maps = maps
        self.sub_maps = sub_maps if sub_maps is not None else [[[m, m] for m in pair] for pair in maps]
        self.curves = []
        for h1, h2 in maps:
            self.freq, curve = fsc(h1 * mask, h2 * mask)
            self.curves.append(torch.nan_to_num(curve, nan=0.0))

    def members(self, junk: Tensor | None) -> list[int]:
        """Particles whose most probable class each class is (junk not counted)."""
        lab = self.labels if junk is None else self.labels[~junk]
        return [int((lab == c).sum()) for c in range(self.k)]


def dealt_labels(half: np.ndarray | Tensor, n_classes: int, seed: int) -> Tensor:
    """Classes ``(N,)`` int64 in ``0..K-1`` dealt at random, each half set's particles spread evenly."""
    half = torch.as_tensor(np.asarray(half))
    g = torch.Generator().manual_seed(seed)
    labels = torch.empty(half.shape[0], dtype=torch.int64)
    for k in (1, 2):
        members = torch.nonzero(half == k).flatten()
        order = members[torch.randperm(members.numel(), generator=g)]
        labels[order] = torch.arange(order.numel()) % n_classes
    return labels


def classify_poses(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float,
                   rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray, half_set: Tensor | np.ndarray,
                   n_classes: int, cfg: RefineConfig | None = None, device: torch.device | str | None = None,
                   progress: Progress | None = None, labels: Tensor | None = None,
                   initial_maps: list[tuple[Tensor, Tensor]] | None = None, seed: int = 0,
                   comm: Communicator | None = None) -> ClassResult:
    """``K = n_classes`` classes and every particle's class and pose, by global passes (module docstring).

    Arguments as :func:`~cryofastar_core.refine.driver.refine_poses` (``cfg``'s global-pass and junk
    settings apply; its local iterations do not run here). ``labels`` ``(N,)``: starting classes (default:
    dealt at random with ``seed``); ``initial_maps``: each class's two starting half maps (default:
    reconstructed from the starting poses and classes).
    """
    cfg = cfg or RefineConfig()
    cfg.validate()
    if not 2 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"classify_poses: n_classes must be 2 to {MAX_CLASSES} (one class: refine_poses)")
    if cfg.global_step_deg is None:
        raise ValueError("classify_poses: the classes are found by global passes; global_step_deg must be set")
    st = start_state(load_images, ctf, apix, rotations, shifts, half_set, cfg, device, progress, None, comm)
    start = labels.long() if labels is not None else _starting_labels(st, n_classes, seed)
    cls = _Classes(R=st.R[None].repeat(n_classes, 1, 1, 1), s=st.s[None].repeat(n_classes, 1, 1),
                   prob=torch.nn.functional.one_hot(start, n_classes).double())
    _starting_maps(st, cls, initial_maps)
    for number in range(cfg.global_passes):
        if _class_pass(st, cls, number)["fraction_moved"] < cfg.global_settle_fraction:
            break
    _match_halves(st, cls, _band_shells(st, cls))  # the last pass may have swapped half 2's labels
    return ClassResult(labels=cls.labels, rotations=st.R, shifts=st.s, probabilities=cls.prob,
                       maps=[(h1, h2) for h1, h2 in cls.maps], history=st.history, junk=st.junk,
                       junk_score=st.junk_score, junk_rule=st.junk_rule)


# --- Start -------------------------------------------------------------------------------------------

def ranked_labels(fit: Tensor, half: np.ndarray | Tensor, n_classes: int) -> Tensor:
    """Classes ``(N,)`` int64 in ``0..K-1`` by rank of ``fit`` ``(N,)`` within each half set: the best-fitting
    ``K``-th of each half in class 0, the next in class 1, and so on (ties in index order)."""
    half = torch.as_tensor(np.asarray(half))
    labels = torch.empty(half.shape[0], dtype=torch.int64)
    for k in (1, 2):
        members = torch.nonzero(half == k).flatten()
        order = members[torch.argsort(-torch.as_tensor(fit)[members].double(), stable=True)]
        labels[order] = torch.arange(order.numel()) * n_classes // max(1, order.numel())
    return labels


def seeded_labels(fit: Tensor | np.ndarray, half: np.ndarray | Tensor, n_classes: int, fraction: float) -> Tensor:
    """Classes ``(N,)`` int64 in ``0..K-1`` that seed classes ``1..K-1`` with the particles ``fit`` ``(N,)`` ranks
    worst: within each half set, the worst-fitting ``min(fraction, 1/K)`` start class ``K-1``, the next as many
    class ``K-2``, and so on; the rest class 0."""
    half = torch.as_tensor(np.asarray(half))
    share = min(fraction, 1.0 / n_classes)
    labels = torch.zeros(half.shape[0], dtype=torch.int64)
    for k in (1, 2):
        members = torch.nonzero(half == k).flatten()
        order = members[torch.argsort(torch.as_tensor(fit)[members].double(), stable=True)]
        size = int(round(share * order.numel()))
        for c in range(n_classes - 1, 0, -1):
            labels[order[:size]] = c
            order = order[size:]
    return labels


def consensus_fit(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float,
                  rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray, half_set: Tensor | np.ndarray,
                  cfg: RefineConfig, device: torch.device | str | None = None,
                  comm: Communicator | None = None) -> Tensor:
    """How well one map of all the particles fits each of them at its pose: the peak over spread ``(N,)``
    float64 of :func:`_consensus_fit` (arguments as :func:`classify_poses`; ``cfg.global_step_deg`` the grid)."""
    st = start_state(load_images, ctf, apix, rotations, shifts, half_set, cfg, device, None, None, comm)
    return _consensus_fit(st)


def _starting_labels(st: RefineState, n_classes: int, seed: int) -> Tensor:
    """The classes the passes start from (``cfg.class_start``): dealt at random, or ranked by how well the
    consensus fits each particle. Dealt, the classes start alike and split along whatever differs most, which
    with another protein as a fifth of the set is not the protein (bench/results/2026-12-06-classes.md);
    ranked, the particles the consensus fits worst start together."""
    if st.cfg.class_start == "dealt":
        return dealt_labels(st.half, n_classes, seed)
    return ranked_labels(_consensus_fit(st), st.half, n_classes)


def _consensus_fit(st: RefineState) -> Tensor:
    """Every particle's :func:`~cryofastar_core.refine.global_pass.peak_over_spread` ``(N,)`` against the
    one-class map of the other sub-half of its own half (no self-match, see :func:`_sub`), made at the
    starting poses. Only what that score needs is built: the band, its FSC weight, the shift grid and the
    sub-half maps' grid projections (one class has no halves to match nor frames to hand)."""
    cfg = st.cfg
    one = _Classes(R=st.R[None].clone(), s=st.s[None].clone(), prob=torch.ones(st.n, 1, dtype=torch.float64))
    _starting_maps(st, one, None)
    band = FourierBand(st.box, _band_shells(st, one), st.device)
    grid = so3_grid(cfg.global_step_deg)
    projections = [[grid_projections(prepared_reference(st, m, band), band, grid) for m in subs]
                   for subs in one.sub_maps[0]]
    fit_band = _FitBand(band=band, filt=fsc_filter(one.curves[0], band, cfg),
                        deltas=shift_grid(cfg.global_shift_step_px, cfg.global_shift_radius_px))
    rows, fit = [], []
    st.on_every_rank(_fit_scan, st, fit_band, projections, rows, fit)
    values, _ = st.end_pass([], None, rows, [fit])
    st.spectrum = PowerSpectrum(st.box, st.device)  # the classes' starting maps measure it again
    log.info("classes: started from the consensus fit (peak over spread: median %.2f)", float(values[0].median()))
    return values[0]


@dataclass
class _FitBand:
    """What :func:`_fit_scan` matches in: the band, its FSC weight ``filt`` and the shift grid ``deltas``."""

    band: FourierBand
    filt: Tensor
    deltas: Tensor


def _fit_scan(st: RefineState, plan: _FitBand, projections: list[list[Tensor]], rows: list[Tensor],
              fit: list[Tensor]) -> None:
    """This rank's part of :func:`_consensus_fit`."""
    for idx, _, X, w in on_band(st.chunks(), plan.band, plan.filt, st.spectrum, PowerSpectrum(st.box, st.device),
                                st.cfg):
        for k, sel, gi in by_half(st.half, idx):
            sub = sub_half(gi)
            for b in (0, 1):
                m = sub == b
                if bool(m.any()):
                    g = gi[m]
                    fit.append(peak_over_spread(projections[k - 1][1 - b], plan.band, X[sel[m].to(st.device)],
                                                st.s[g], plan.deltas, w, st.ctf_of(g), st.apix).double().cpu())
                    rows.append(g)


def _new_backprojectors(st: RefineState, k: int) -> list[list[list[Backprojector]]]:
    """Per class, per sub-half, a pair of back-projectors (half 1, half 2)."""
    return [[st.new_backprojectors() for _ in range(2)] for _ in range(k)]


def _flat(bps: list[list[list[Backprojector]]]) -> list[Backprojector]:
    return [bp for per_class in bps for pair in per_class for bp in pair]


def _finish_maps(st: RefineState, cls: "_Classes", bps: list[list[list[Backprojector]]]) -> None:
    """The sub-half maps; in each half, sub-half 1's classes relabelled as the sub-half-0 classes they
    resemble most (each sub-half is assigned against the other's maps, so their labels can swap from pass
    to pass); then (summed) each class's two half maps, made the current ones."""
    K = len(bps)
    sub_maps = [[[bps[c][b][h].finalize() for b in range(2)] for h in range(2)] for c in range(K)]
    for h in range(2):
        corr = np.array([[_correlation(sub_maps[i][h][0], sub_maps[j][h][1], st.mask) for j in range(K)]
                         for i in range(K)])
        perm = _best_permutation(corr)
        if perm != list(range(K)):
            rows = (st.half == h + 1) & (sub_half(torch.arange(st.n)) == 1)
            _relabel(cls, rows, perm)
            moved = [bps[perm[c]][1][h] for c in range(K)]
            moved_maps = [sub_maps[perm[c]][h][1] for c in range(K)]
            for c in range(K):
                bps[c][1][h], sub_maps[c][h][1] = moved[c], moved_maps[c]
    maps = [[bps[c][0][h].add_(bps[c][1][h]).finalize() for h in range(2)] for c in range(K)]
    cls.set_maps(maps, st.mask, sub_maps)


def _correlation(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Normalised correlation of two maps in one frame, inside ``mask``."""
    a, b = (a * mask).double(), (b * mask).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp_min(1e-30))


def _best_permutation(corr: np.ndarray) -> list[int]:
    """``perm`` maximising ``sum_i corr[i, perm[i]]``: class ``perm[i]`` of the second set is class ``i`` of
    the first (every permutation tried: ``K`` is at most 8)."""
    K = corr.shape[0]
    return list(max(itertools.permutations(range(K)), key=lambda p: sum(corr[i, p[i]] for i in range(K))))


def _relabel(cls: "_Classes", rows: Tensor, perm: list[int]) -> None:
    """Particles ``rows`` ``(N,)`` bool: what was their class ``perm[c]`` becomes class ``c``."""
    p = torch.as_tensor(perm)
    cls.prob[rows] = cls.prob[rows][:, p]
    cls.R[:, rows], cls.s[:, rows] = cls.R[p][:, rows], cls.s[p][:, rows]


def _insert_by_class(st: RefineState, cls: _Classes, bps: list[list[list[Backprojector]]], idx: np.ndarray,
                     imgs: Tensor) -> None:
    """The chunk ``imgs`` ``(n, D, D)`` of particles ``idx`` into every class's half maps, each at its pose in
    that class and weighted by its probability of belonging there (junk left out with ``exclude_junk``)."""
    gi = torch.as_tensor(idx)
    use = torch.ones(gi.shape[0], dtype=torch.bool)
    if st.junk is not None and st.cfg.exclude_junk:
        use = ~st.junk[gi]
    dev = st.device
    sub = sub_half(gi)
    for c, per_sub in enumerate(bps):
        p = cls.prob[gi, c]
        for b, pair in enumerate(per_sub):
            m = use & (p > MIN_PROBABILITY) & (sub == b)
            if not bool(m.any()):
                continue
            g = gi[m]
            insert_half_sets(pair, imgs[m.to(imgs.device)], cls.R[c, g].to(dev, torch.float32), st.half[g],
                             shifts=cls.s[c, g].to(dev, torch.float32), ctf=st.ctf_of(g), apix=st.apix,
                             weights=p[m].to(dev, torch.float32))


def _starting_maps(st: RefineState, cls: _Classes, given: list[tuple[Tensor, Tensor]] | None) -> None:
    """Each class's half maps at the starting poses and classes (one pass over the data), or ``given``."""
    if given is None:
        bps = _new_backprojectors(st, cls.k)
        st.on_every_rank(starting_scan, st, partial(_insert_by_class, st, cls, bps), "classes: starting maps")
        st.end_pass(_flat(bps), st.spectrum)
        _finish_maps(st, cls, bps)
        return
    if len(given) != cls.k:
        raise ValueError(f"classify_poses: {len(given)} pairs of starting maps for {cls.k} classes")
    cls.set_maps([[m.to(st.device, torch.float32) for m in pair] for pair in given], st.mask)
    starting_power(st)


# --- One pass ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class _ClassPlan:
    """One pass's search, common to all classes: the ``band`` (radius ``r_lim``), the FSC weight ``filt``
    ``(P,)``, the rotation ``grid`` ``(J, 3, 3)`` and shift offsets ``deltas`` ``(T, 2)``; per class and half
    ``refs[c][h]`` the prepared half maps, ``projections[c][h]`` ``(J, P)``, per class, half and sub-half
    ``sub_refs[c][h][b]`` the prepared sub-half maps, ``frames[c]`` its half-2
    registration, ``active[c]`` whether it has particles to compare with."""

    r_lim: float
    band: FourierBand
    filt: Tensor
    grid: Tensor
    deltas: Tensor
    E_here: Tensor
    refs: list[list]
    projections: list[list[Tensor]]
    sub_refs: list[list[list]]
    frames: list[HalfFrame]
    active: list[bool]


def _class_plan(st: RefineState, cls: _Classes) -> _ClassPlan:
    """The next pass's plan from the current class maps: the band reaches as far as the best class's FSC =
    0.5 crossing (at most ``global_max_shells``); the FSC weight is the mean of the occupied classes'."""
    cfg, D, dev = st.cfg, st.box, st.device
    active = [n > 0 for n in _members(st, cls)]
    occupied = _occupied(st, cls)
    r_lim = _band_shells(st, cls)
    _match_halves(st, cls, r_lim)
    band = FourierBand(D, r_lim, dev)
    grid = so3_grid(cfg.global_step_deg)
    deltas = shift_grid(cfg.global_shift_step_px, cfg.global_shift_radius_px)
    refs = [[prepared_reference(st, m, band) for m in pair] for pair in cls.maps]
    projections = [[grid_projections(v, band, grid) for v in pair] for pair in refs]
    sub_refs = [[[prepared_reference(st, m, band) for m in subs] for subs in halves] for halves in cls.sub_maps]
    mean_curve = torch.stack([cls.curves[c] for c in occupied]).mean(0)
    frames = [half_frame(cls.maps[c], st.mask, r_lim, cls.curves[c], cfg, cfg.global_step_deg) if active[c]
              else HalfFrame(None) for c in range(cls.k)]
    return _ClassPlan(r_lim=r_lim, band=band, filt=fsc_filter(mean_curve, band, cfg), grid=grid, deltas=deltas,
                      E_here=band.ramps(deltas.to(dev), torch.float32).T.contiguous(), refs=refs,
                      projections=projections, sub_refs=sub_refs, frames=frames, active=active)


def _band_shells(st: RefineState, cls: _Classes) -> float:
    """The band of the next pass: as far as the best occupied class's FSC = 0.5 crossing, at most
    ``global_max_shells``."""
    cfg = st.cfg
    return min(max(matching_shells(cls.freq, cls.curves[c], st.box, cfg.first_fsc_threshold, cfg)
                   for c in _occupied(st, cls)), cfg.global_max_shells)


def _members(st: RefineState, cls: _Classes) -> list[int]:
    """Particles per class, the junk not counted when it is left out of the maps (``exclude_junk``)."""
    return cls.members(st.junk if st.cfg.exclude_junk else None)


def _occupied(st: RefineState, cls: _Classes) -> list[int]:
    """The classes with particles (all of them when none has any)."""
    return [c for c, n in enumerate(_members(st, cls)) if n > 0] or list(range(cls.k))


def _match_halves(st: RefineState, cls: _Classes, shells: float) -> None:
    """Give half 2's classes the labels of the half-1 classes they are (the halves are classified apart, so
    nothing else ties half 2's class 0 to half 1's): every half-2 class map is registered onto every half-1
    class map (all rotations, both hands), and the permutation with the highest summed correlation is
    applied to half 2's maps and to its particles' probabilities and poses."""
    K = cls.k
    corr = np.zeros((K, K))
    for i in range(K):
        for j in range(K):
            reg = register_map(cls.maps[j][1] * st.mask, cls.maps[i][0] * st.mask, shells,
                               coarse_step_deg=st.cfg.global_step_deg, allow_mirror=True)
            corr[i, j] = reg.correlation
    perm = _best_permutation(corr)
    if perm == list(range(K)):
        return
    log.info("classes: half 2's classes %s are half 1's %s", perm, list(range(K)))
    _relabel(cls, st.half == 2, perm)
    maps = [[cls.maps[c][0], cls.maps[perm[c]][1]] for c in range(K)]
    subs = [[cls.sub_maps[c][0], cls.sub_maps[perm[c]][1]] for c in range(K)]
    cls.set_maps(maps, st.mask, subs)


def _best_in_class(st: RefineState, plan: _ClassPlan, c: int, k: int, b: int, X: Tensor, gi: Tensor, R: Tensor,
                   s: Tensor, w: Tensor, ctf_k: CTFParams | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """In class ``c``, per particle of half ``k`` (band transforms ``X`` ``(n, P)``, current poses ``R``
    ``(n, 3, 3)``, ``s`` ``(n, 2)`` in that class): ``(R_new, s_new, score, grid_score)``. The pose is
    searched against the class's half map, as with one class: the best grid pose, or the current one
    where it scores higher (``global_keep_better``); ``grid_score`` is the grid's best (the evidence,
    :mod:`cryofastar_core.refine.junk`). ``score``, what the class is chosen by, is the particle's score
    at that pose against the map of sub-half ``b`` (the other one: no self-match)."""
    j, t, grid_best = best_on_grid(plan.projections[c][k - 1], plan.band, X, s, plan.deltas, w, ctf_k, st.apix)
    R_new, s_new = plan.grid[j.cpu()], s + plan.deltas[t.cpu()]
    identity = torch.eye(3, dtype=torch.float64)[None]
    if st.cfg.global_keep_better:
        here = candidate_scores(plan.refs[c][k - 1], plan.band, X, R, s, identity, plan.E_here, w, ctf_k, st.apix,
                                st.cfg.batch_points)[:, 0]
        here_best, here_t = here.max(-1)
        stay = (here_best >= grid_best).cpu()
        R_new = torch.where(stay[:, None, None], R, R_new)
        s_new = torch.where(stay[:, None], s + plan.deltas[here_t.cpu()], s_new)
    cross = candidate_scores(plan.sub_refs[c][k - 1][b], plan.band, X, R_new, s_new, identity, plan.E_here, w, ctf_k,
                             st.apix, st.cfg.batch_points)[:, 0].max(-1).values
    return R_new, s_new, cross, grid_best


def _null_evidence(st: RefineState, plan: _ClassPlan, k: int, b: int, X: Tensor, gi: Tensor, w: Tensor,
                   ctf_k: CTFParams | None, tally: "_ClassTally") -> None:
    """For every ``junk_null_every``-th particle, its phase-randomised copy's best grid score over every class
    (:mod:`cryofastar_core.refine.junk`), phases drawn from the particle's own index."""
    null = torch.zeros(gi.shape[0], dtype=torch.float64)
    chosen = (gi % st.cfg.junk_null_every == 0)
    if bool(chosen.any()):
        pick = torch.nonzero(chosen).flatten()
        X_null = torch.cat([randomised_phases(X[int(i):int(i) + 1], torch.Generator().manual_seed(int(gi[i])))
                            for i in pick])
        ctf_null = None if ctf_k is None else ctf_k.index(pick.to(st.device))
        scores = [best_on_grid(plan.projections[c][k - 1], plan.band, X_null, st.s[gi[pick]], plan.deltas, w,
                               ctf_null, st.apix)[2] for c in range(len(plan.refs)) if plan.active[c]]
        null[pick] = torch.stack(scores).max(0).values.detach().double().cpu()
    tally.null.append(null)
    tally.null_mask.append(chosen.double())


@dataclass(eq=False)
class _ClassTally(PassTally):
    """A class pass's tally: also whether each particle's most probable class changed."""

    changed: list[Tensor] = field(default_factory=list)


def _class_step(st: RefineState, cls: _Classes, plan: _ClassPlan, k: int, b: int, X: Tensor, gi: Tensor, w: Tensor,
                tally: _ClassTally) -> None:
    """The particles ``gi`` of half ``k``: a new pose in every class (in that class's half-1 frame), new class
    probabilities ``softmax(max(score, 0)^2 / 2)`` over the classes, and as their pose (``st.R``, ``st.s``)
    the one in their most probable class."""
    ctf_k = st.ctf_of(gi)
    n = gi.shape[0]
    loglik = torch.full((cls.k, n), -torch.inf, dtype=torch.float64)
    evidence = torch.zeros(n, dtype=torch.float64)
    for c in range(cls.k):
        if not plan.active[c]:
            continue
        R_c, s_c, best, grid_best = _best_in_class(st, plan, c, k, b, X, gi, cls.R[c, gi], cls.s[c, gi], w, ctf_k)
        cls.R[c, gi], cls.s[c, gi] = plan.frames[c](k, R_c, s_c)
        loglik[c] = best.double().cpu().clamp_min(0.0) ** 2 / 2
        evidence = torch.maximum(evidence, grid_best.double().cpu())
    if tally.evidence is not None:
        tally.evidence.append(evidence)
        _null_evidence(st, plan, k, b, X, gi, w, ctf_k, tally)
    old = cls.labels[gi]
    cls.prob[gi] = torch.softmax(loglik, 0).T
    new = cls.labels[gi]
    R_new, s_new = cls.R[new, gi], cls.s[new, gi]
    tally.record(st.R[gi], R_new, st.s[gi], s_new, gi)
    tally.changed.append((new != old).double())
    st.R[gi], st.s[gi] = R_new, s_new


def _class_scan(st: RefineState, cls: _Classes, plan: _ClassPlan, new_bps: list[list[list[Backprojector]]],
                next_spectrum: PowerSpectrum, tally: _ClassTally, stage: str) -> None:
    """This rank's part of a pass: every chunk matched per half against every class, and inserted into every
    class's maps at its new pose there, weighted by its new probability."""
    done = 0
    for idx, imgs, X, w in on_band(st.chunks(), plan.band, plan.filt, st.spectrum, next_spectrum, st.cfg):
        for k, sel, gi in by_half(st.half, idx):
            sub = sub_half(gi)
            for b in (0, 1):  # particles of sub-half b are matched against the other sub-half's maps
                m = sub == b
                if bool(m.any()):
                    _class_step(st, cls, plan, k, 1 - b, X[sel[m].to(st.device)], gi[m], w, tally)
        _insert_by_class(st, cls, new_bps, idx, imgs)
        done += len(idx)
        st.tick(stage, done)


def _share_classes(st: RefineState, cls: _Classes) -> None:
    """Every rank changed only its own particles' rows of the per-class poses and probabilities: summed over
    the ranks, every rank has them all."""
    if not st.distributed:
        return
    others = torch.ones(st.n, dtype=torch.bool)
    others[st.own] = False
    cls.R[:, others], cls.s[:, others], cls.prob[others] = 0.0, 0.0, 0.0
    share(st.comm, [cls.R, cls.s, cls.prob], st.device)


def _class_pass(st: RefineState, cls: _Classes, number: int) -> dict:
    """Global pass ``number`` (from 0) over every class; returns its history entry."""
    cfg = st.cfg
    t0 = time.perf_counter()
    plan = _class_plan(st, cls)
    tally = _ClassTally(evidence=[], null=[], null_mask=[]) if cfg.detect_junk else _ClassTally()
    next_spectrum = PowerSpectrum(st.box, st.device)
    new_bps = _new_backprojectors(st, cls.k)
    stage = f"classes: global pass {number + 1} ({cls.k} classes)"
    st.on_every_rank(_class_scan, st, cls, plan, new_bps, next_spectrum, tally, stage)
    values, _ = st.end_pass(_flat(new_bps), next_spectrum, tally.rows,
                            [*tally.per_particle(), tally.changed])
    _share_classes(st, cls)
    st.spectrum = next_spectrum
    moved_deg, moved_px, changed = values[0], values[1], values[-1] > 0.5
    entry = dict(stage="classes", iteration=number + 1, n_classes=cls.k, match_shells=plan.r_lim,
                 n_rotations=int(plan.grid.shape[0]), n_shifts=int(plan.deltas.shape[0]),
                 **moved_fields(moved_deg, moved_px), fraction_changed_class=float(changed.double().mean()))
    if cfg.detect_junk:
        entry["junk"] = decide_junk(st, *values[2:5])
    _finish_maps(st, cls, new_bps)
    moved = (moved_deg > cfg.global_step_deg / 2) | changed
    if st.junk is not None and bool((~st.junk).any()):
        moved = moved[~st.junk]
    entry["fraction_moved"] = float(moved.double().mean())
    entry["classes"] = _class_fields(st, cls)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    st.history.append(entry)
    log.info("classes: global pass %d: %s particles per class, %.1f %% changed class, poses moved %.1f deg "
             "(median), %.1f s", number + 1, "/".join(str(c["particles"]) for c in entry["classes"]),
             100 * entry["fraction_changed_class"], entry["median_rotation_change_deg"], entry["seconds"])
    return entry


def _class_fields(st: RefineState, cls: _Classes) -> list[dict]:
    """Per class: its particles (junk not counted), their mean probability of belonging there, and its half
    maps' FSC resolutions (Å)."""
    n = _members(st, cls)
    labels = cls.labels
    out = []
    for c in range(cls.k):
        m = labels == c
        out.append(dict(particles=n[c], mean_probability=float(cls.prob[m, c].mean()) if bool(m.any()) else 0.0,
                        resolution_0143=float(resolution_at(cls.freq, cls.curves[c], st.apix, 0.143)),
                        resolution_05=float(resolution_at(cls.freq, cls.curves[c], st.apix, 0.5))))
    return out
