"""Refinement with several classes (``classes`` > 1): a consensus, the classes, then each class refined.

1. **Consensus.** The one-class global passes, as a one-class run's ab initio (on the subset at the ab
   initio box when there is one, :mod:`cryofastar_core.job.work_scale`): poses that fit one map of every
   conformation. From random poses the classes do not converge (:mod:`cryofastar_core.refine.classes`).
2. **Classes** on the same particles (:func:`~cryofastar_core.refine.classes.classify_poses`), until they
   settle; junk is found there. The particles the consensus fits worst seed the classes after the first,
   each from an ab initio of its own seed (:func:`_seeded_start`); the rest start the first class at their
   consensus poses.
3. **Every particle** (with a subset): one class pass at the local box against the classes' maps.
4. **Each class** refined on its own particles by the local iterations (no global pass), from its maps; a
   class whose poses are then not judged ``ok`` is also refined from a one-class ab initio of its own
   particles (random start), and the better judged result kept.

Classes are numbered from 1 by size, largest first; a particle's class is its most probable one.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.geometry import random_rotations
from cryofastar_core.io import ParticleSet
from cryofastar_core.job.judge import best_of_starts, judge_result
from cryofastar_core.job.config import JobConfig
from cryofastar_core.job.refine_at import Refined, ab_initio_at, ab_initio_on_subset, padded_to, refine_at
from cryofastar_core.job.work_scale import cropped_loader, plan_work
from cryofastar_core.refine.classes import ClassResult, classify_poses, consensus_fit, dealt_labels, seeded_labels
from cryofastar_core.refine.driver import RefineConfig
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)


def refine_classes(cfg: JobConfig, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray,
                   half: np.ndarray, keep: np.ndarray, apix: float, device: torch.device,
                   progress: Progress | None = None, comm: Communicator | None = None):
    """The ``keep`` particles refined in ``cfg.classes`` classes (module docstring); returns the job's
    :class:`~cryofastar_core.job.refine_at.Refined` with ``classes`` ``(N,)`` (1..K, 0 where not refined) and,
    when refinement worked at the input box, every class's ``(full, half1, half2)`` maps."""
    idx = np.flatnonzero(keep)
    scale = plan_work(particles.box, apix, half[idx], cfg.target_resolution, cfg.ab_initio_particles, cfg.seed)
    rcfg = RefineConfig(iterations=cfg.refine_iters, exclude_junk=not cfg.keep_junk)
    R, s = rotations[idx].copy(), shifts[idx].copy()
    sub = scale.subset if scale.subset is not None else np.arange(len(idx))
    box = scale.ab_initio_box
    log.info("classes: a consensus of %d particles at box %d, then %d classes", len(sub), box, cfg.classes)
    if scale.subset is not None:
        _, history = ab_initio_on_subset(particles, idx, scale, R, s, half, apix, rcfg, device, progress, comm)
    else:
        cons = ab_initio_at(particles, idx, box, R, s, half[idx], apix, rcfg, device, progress, comm)
        R, s = cons.rotations.numpy(), cons.shifts.numpy()
        history = [dict(h, particles="consensus") for h in cons.history]
    start, R[sub], s[sub] = _seeded_start(particles, idx[sub], scale, R[sub], s[sub], half, apix, rcfg, cfg, device,
                                          progress, comm)
    found = _classify_at(particles, idx[sub], box, R[sub], s[sub], half[idx[sub]], apix, rcfg, cfg, start, None,
                         device, progress, comm)
    history += [dict(h, particles="classes" if scale.subset is None else "classes, ab initio subset")
                for h in found.history]
    labels = found.labels.numpy()
    R[sub], s[sub] = found.rotations.numpy(), found.shifts.numpy() / (box / particles.box)
    junk, score, rule = _junk_of(found, sub, len(idx))
    maps = found.maps
    if scale.subset is not None:
        every = _every_particle(particles, idx, scale, R, s, half, apix, rcfg, cfg, labels, sub, found, device,
                                progress, comm)
        history += [dict(h, particles="classes") for h in every.history]
        labels, maps = every.labels.numpy(), every.maps
        R, s = every.rotations.numpy(), every.shifts.numpy() / (scale.local_box / particles.box)
        junk, score, rule = _junk_of(every, np.arange(len(idx)), len(idx))
    order = _by_size(labels, junk, cfg.classes)
    class_maps = []
    for number, c in enumerate(order, start=1):
        members = np.flatnonzero((labels == c) & ~junk)
        if len(members) < 2:
            log.warning("class %d holds %d particles: nothing to refine", number, len(members))
            class_maps.append(None)
            continue
        result, note = _refine_class(particles, idx[members], scale, R[members], s[members], half, apix, rcfg,
                                     padded_to(maps[c], scale.local_box), number, cfg.seed, device, progress, comm)
        R[members], s[members] = result.rotations, result.shifts
        history += [dict(h, particles=f"class {number}{note}") for h in result.history]
        class_maps.append((result.full, result.half1, result.half2))
    numbers = np.zeros(len(idx), dtype=np.int64)
    for number, c in enumerate(order, start=1):
        numbers[labels == c] = number
    return _refined(rotations, shifts, idx, R, s, numbers, junk, score, rule, history, scale,
                    class_maps if scale.local_box == particles.box else None, len(keep))


# The share of each half set, per class after the first, that the consensus fits worst and that starts that
# class from an ab initio of its own. Another protein as 18 % of the kept particles: the worst-fitting fifth
# is 71 % of it, and from there the classes separate (bench/results/2026-12-06-classes.md, session 17).
SEED_FRACTION = 0.2
# ...but at least this many particles per half set: a seed's maps are built from a quarter of it per
# sub-half; with 60 per half (a fifth of 300 of each of two blob volumes, tests/test_classes.py, seeded
# from random poses) the seeded class drained to a sink of 73 particles.
SEED_PARTICLES_PER_HALF = 250


def _seeded_start(particles: ParticleSet, idx: np.ndarray, scale, R: np.ndarray, s: np.ndarray, half: np.ndarray,
                  apix: float, rcfg: RefineConfig, cfg: JobConfig, device: torch.device, progress: Progress | None,
                  comm: Communicator | None) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """The class passes' start for the particles ``idx`` at consensus poses ``R`` ``(n, 3, 3)``, ``s`` ``(n, 2)``
    (input px): classes 1..K-1 (0-based) seeded with the particles the consensus fits worst
    (:func:`~cryofastar_core.refine.classes.seeded_labels`); class 0 the rest at their consensus poses. A
    seed's poses come from an ab initio of the seed alone, from its consensus poses when that is judged
    ``ok`` (another conformation: the consensus fits it roughly), else from random poses (another protein:
    its consensus poses are noise, and a class started from them makes a map of the consensus, which its
    particles never leave; the "fit" start of session 13 lost a third of the good particles to it).
    Returns the labels ``(n,)`` and the poses."""
    box = scale.ab_initio_box
    load, ctf, to_box = _cropped(particles, idx, box, device)
    own_half = half[idx]
    fit = consensus_fit(load, ctf, apix / to_box, R, s * to_box, own_half, rcfg, device, comm)
    per_half = min(int((own_half == k).sum()) for k in (1, 2))
    labels = seeded_labels(fit, own_half, cfg.classes, max(SEED_FRACTION, SEED_PARTICLES_PER_HALF / max(per_half, 1)))
    R, s = R.copy(), s.copy()
    for c in range(1, cfg.classes):
        rows = np.flatnonzero(labels.numpy() == c)
        log.info("classes: class %d of %d starts from the %d particles the consensus fits worst", c + 1, cfg.classes,
                 len(rows))
        seeded = ab_initio_at(particles, idx[rows], box, R[rows], s[rows], own_half[rows], apix, rcfg, device,
                              progress, comm)
        judged = judge_result(particles, idx[rows], seeded, half, device)
        if judged.verdict != "ok":
            log.info("classes: class %d's seed at its consensus poses is judged %s; an ab initio from random poses",
                     c + 1, judged.verdict)
            seeded = _ab_initio_restarts(particles, idx[rows], scale, s[rows], half, apix, rcfg,
                                         cfg.seed + 104729 * c, device, progress, comm)
        R[rows], s[rows] = seeded.rotations.numpy(), seeded.shifts.numpy()
    return labels, R, s


def _refine_class(particles: ParticleSet, members: np.ndarray, scale, R: np.ndarray, s: np.ndarray, half: np.ndarray,
                  apix: float, rcfg: RefineConfig, maps: tuple, number: int, seed: int, device: torch.device,
                  progress: Progress | None, comm: Communicator | None) -> tuple:
    """Class ``number``'s particles ``members`` refined locally from its maps; when the verdict on the result
    is not ``ok``, also from a one-class ab initio of the same particles from random poses, and the better
    judged of the two kept. The consensus fits the conformation most particles share, so another class
    starts from poses that fit the wrong map and its class passes do not leave them
    (bench/results/2026-12-06-classes.md). Returns the result and a note for its history."""
    log.info("class %d: refining %d particles at box %d", number, len(members), scale.local_box)
    local = replace(rcfg, global_step_deg=None)
    result = refine_at(particles, members, scale.local_box, R, s, half[members], apix, local, maps, device,
                       progress, comm)
    judged = judge_result(particles, members, result, half, device)

    def afresh(_k: int, _so_far):
        log.info("class %d: its poses are judged %s; an ab initio of its %d particles from random poses",
                 number, judged.verdict, len(members))
        fresh = _ab_initio_restarts(particles, members, scale, s, half, apix, rcfg, seed + 7919 * number, device,
                                    progress, comm)
        again = refine_at(particles, members, scale.local_box, fresh.rotations.numpy(), fresh.shifts.numpy(),
                          half[members], apix, local, padded_to((fresh.half1, fresh.half2), scale.local_box), device,
                          progress, comm)
        again.history = fresh.history + again.history
        return again

    def told(_k: int, rejudged) -> None:
        log.info("class %d: from its maps %s (sharpness %.2f), afresh %s (sharpness %.2f)", number, judged.verdict,
                 judged.sharpness, rejudged.verdict, rejudged.sharpness)

    best = best_of_starts(afresh, lambda again: judge_result(particles, members, again, half, device), 1, told,
                          first=(result, judged))
    return best, "" if best is result else ", afresh"


# Ab initio from random poses converges on some starts and not others (1AKE: 0.4-101° over 3 seeds); the AK
# closed class needed more than 3 (bench/results/2026-12-06-classes.md, session 13). A start that settles
# in a wrong minimum stops early, so a failing start costs tens of seconds at 2,000 particles.
RESTARTS = 5
# From random poses the global passes take longer to settle than from a consensus: a start that converged
# (1AKE, 2,000 particles, SNR 0.1) was still sharpening at the job's 20th pass and settled at the 24th
# (bench/results/2026-12-06-classes.md, session 13).
RANDOM_START_PASSES = 40


def _ab_initio_restarts(particles: ParticleSet, members: np.ndarray, scale, s: np.ndarray, half: np.ndarray,
                        apix: float, rcfg: RefineConfig, seed: int, device: torch.device, progress: Progress | None,
                        comm: Communicator | None):
    """Up to :data:`RESTARTS` one-class ab initio runs (global passes at the ab initio box) of ``members`` from
    random poses, each judged from the data; the first judged ``ok``, else the best judged
    (:func:`~cryofastar_core.job.judge.best_of_starts`)."""
    passes = replace(rcfg, global_passes=max(rcfg.global_passes, RANDOM_START_PASSES))

    def attempt(k: int, _so_far):
        start = random_rotations(len(members), generator=torch.Generator().manual_seed(seed + k - 1),
                                 dtype=torch.float64).numpy()
        return ab_initio_at(particles, members, scale.ab_initio_box, start, s, half[members], apix, passes, device,
                            progress, comm)

    def told(k: int, judged) -> None:
        log.info("ab initio from random poses, start %d of %d: %s (sharpness %.2f)", k, RESTARTS, judged.verdict,
                 judged.sharpness)

    return best_of_starts(attempt, lambda fresh: judge_result(particles, members, fresh, half, device), RESTARTS, told)


def _classify_at(particles: ParticleSet, idx: np.ndarray, box: int, R: np.ndarray, s: np.ndarray, half: np.ndarray,
                 apix: float, rcfg: RefineConfig, cfg: JobConfig, labels, maps, device: torch.device,
                 progress: Progress | None, comm: Communicator | None, passes: int | None = None) -> ClassResult:
    """:func:`~cryofastar_core.refine.classes.classify_poses` of the particles ``idx`` at ``box`` (shifts in
    input pixels in, the box's out)."""
    load, ctf, to_box = _cropped(particles, idx, box, device)
    ccfg = replace(rcfg, global_passes=passes or rcfg.global_passes)
    return classify_poses(load, ctf, apix / to_box, R, np.asarray(s) * to_box, half, cfg.classes, ccfg, device=device,
                          progress=progress, labels=labels, initial_maps=maps, seed=cfg.seed, comm=comm)


def _cropped(particles: ParticleSet, idx: np.ndarray, box: int, device: torch.device):
    """What the engine's passes take for the particles ``idx`` at ``box``: their image loader (Fourier-cropped as
    read), their CTF (None without one) and the box's ratio to the input box (pixel size and shifts scale by it)."""
    ctf = particles.ctf_params(idx).to(device) if particles.ctf is not None else None
    return cropped_loader(particles, idx, box, device), ctf, box / particles.box


def _every_particle(particles, idx, scale, R, s, half, apix, rcfg, cfg, labels, sub, found, device, progress, comm):
    """One class pass of every particle at the local box against the subset's class maps (padded to it); the
    subset keeps its classes as the starting ones, the others are dealt."""
    start = dealt_labels(half[idx], cfg.classes, cfg.seed)
    start[torch.as_tensor(sub)] = torch.as_tensor(labels)
    maps = [padded_to(pair, scale.local_box) for pair in found.maps]
    log.info("classes: every particle (%d) against the classes' maps at box %d", len(idx), scale.local_box)
    return _classify_at(particles, idx, scale.local_box, R, s, half[idx], apix, rcfg, cfg, start, maps, device,
                        progress, comm, passes=1)


def _junk_of(result: ClassResult, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The classification's junk flags and scores put at ``rows`` among ``n`` refined particles."""
    junk, score = np.zeros(n, dtype=bool), np.full(n, np.nan)
    if result.junk is not None:
        junk[rows], score[rows] = result.junk.numpy(), result.junk_score.numpy()
    return junk, score, dict(result.junk_rule)


def _by_size(labels: np.ndarray, junk: np.ndarray, k: int) -> list[int]:
    """The class labels ``0..k-1`` ordered by how many (non-junk) particles each holds, largest first."""
    sizes = [int(((labels == c) & ~junk).sum()) for c in range(k)]
    return sorted(range(k), key=lambda c: (-sizes[c], c))


def _refined(rotations, shifts, idx, R, s, numbers, junk, score, rule, history, scale, class_maps, n):
    """The job's :class:`Refined` over all ``n`` particles from the refined particles ``idx``'s results."""
    rotations, shifts = rotations.copy(), shifts.copy()
    rotations[idx], shifts[idx] = R, s
    all_junk, all_score, classes = np.zeros(n, dtype=bool), np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    all_junk[idx], all_score[idx], classes[idx] = junk, score, numbers
    maps = class_maps[0] if class_maps else None
    return Refined(rotations, shifts, history, maps, all_junk, all_score, rule, scale.to_dict(), classes=classes,
                   class_maps=class_maps)
