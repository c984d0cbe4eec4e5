"""Refinement with several classes (``classes`` > 1): a consensus, the classes, then each class refined.

1. **Consensus.** The one-class global passes, as a one-class run's ab initio (on the subset at the ab
   initio box when there is one, :mod:`cryofastar_core.job.work_scale`): poses that fit one map of every
   conformation. From random poses the classes do not converge (:mod:`cryofastar_core.refine.classes`).
2. **Classes** on the same particles, from the consensus poses
   (:func:`~cryofastar_core.refine.classes.classify_poses`), until they settle; junk is found there.
3. **Every particle** (with a subset): one class pass at the local box against the classes' maps.
4. **Each class** refined on its own particles by the local iterations (no global pass), from its maps.

Classes are numbered from 1 by size, largest first; a particle's class is its most probable one.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from cryofastar_core.io import ParticleSet
from cryofastar_core.job.config import JobConfig
from cryofastar_core.job.refine_at import Refined, ab_initio_on_subset, refine_at
from cryofastar_core.job.work_scale import cropped_loader, plan_work
from cryofastar_core.physics.fourier import fourier_pad_volume
from cryofastar_core.refine.classes import ClassResult, classify_poses, dealt_labels
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
        cons = refine_at(particles, idx, box, R, s, half[idx], apix, replace(rcfg, iterations=0, centre_origin=False),
                          None, device, progress, comm)
        R, s = cons.rotations.numpy(), cons.shifts.numpy()
        history = [dict(h, particles="consensus") for h in cons.history]
    found = _classify_at(particles, idx[sub], box, R[sub], s[sub], half[idx[sub]], apix, rcfg, cfg, None, None,
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
        log.info("class %d: refining %d particles at box %d", number, len(members), scale.local_box)
        m = [fourier_pad_volume(v, scale.local_box) if v.shape[-1] < scale.local_box else v for v in maps[c]]
        result = refine_at(particles, idx[members], scale.local_box, R[members], s[members], half[idx[members]], apix,
                            replace(rcfg, global_step_deg=None), tuple(m), device, progress, comm)
        R[members], s[members] = result.rotations, result.shifts
        history += [dict(h, particles=f"class {number}") for h in result.history]
        class_maps.append((result.full, result.half1, result.half2))
    numbers = np.zeros(len(idx), dtype=np.int64)
    for number, c in enumerate(order, start=1):
        numbers[labels == c] = number
    return _refined(rotations, shifts, idx, R, s, numbers, junk, score, rule, history, scale,
                    class_maps if scale.local_box == particles.box else None, len(keep))


def _classify_at(particles: ParticleSet, idx: np.ndarray, box: int, R: np.ndarray, s: np.ndarray, half: np.ndarray,
                 apix: float, rcfg: RefineConfig, cfg: JobConfig, labels, maps, device: torch.device,
                 progress: Progress | None, comm: Communicator | None, passes: int | None = None) -> ClassResult:
    """:func:`~cryofastar_core.refine.classes.classify_poses` of the particles ``idx`` at ``box`` (shifts in
    input pixels in, the box's out)."""
    to_box = box / particles.box
    ctf = particles.ctf_params(idx).to(device) if particles.ctf is not None else None
    ccfg = replace(rcfg, global_passes=passes or rcfg.global_passes)
    return classify_poses(cropped_loader(particles, idx, box, device), ctf, apix / to_box, R, np.asarray(s) * to_box,
                          half, cfg.classes, ccfg, device=device, progress=progress, labels=labels,
                          initial_maps=maps, seed=cfg.seed, comm=comm)


def _every_particle(particles, idx, scale, R, s, half, apix, rcfg, cfg, labels, sub, found, device, progress, comm):
    """One class pass of every particle at the local box against the subset's class maps (padded to it); the
    subset keeps its classes as the starting ones, the others are dealt."""
    start = dealt_labels(half[idx], cfg.classes, cfg.seed)
    start[torch.as_tensor(sub)] = torch.as_tensor(labels)
    maps = [tuple(fourier_pad_volume(v, scale.local_box) if scale.local_box > scale.ab_initio_box else v for v in pair)
            for pair in found.maps]
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
