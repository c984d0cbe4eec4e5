"""Refinement of a set of particles at one box, as every refine path of the job runs it: the result type the
refine stage hands the run (:class:`Refined`), refinement of chosen particles at a chosen box
(:func:`refine_at`) and the ab initio passes on a subset (:func:`ab_initio_on_subset`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cryofastar_core.io import ParticleSet
from cryofastar_core.job.work_scale import WorkScale, cropped_loader
from cryofastar_core.physics.fourier import fourier_pad_volume
from cryofastar_core.refine.driver import RefineConfig, RefineResult, refine_poses
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Refined:
    """What the refine stage gives the run, over all ``N`` particles: new ``rotations`` ``(N, 3, 3)`` and
    ``shifts`` ``(N, 2)`` (unchanged where not refined), the refinement ``history``, its last
    ``(full, half1, half2)`` maps (without the junk unless ``keep_junk``), ``junk`` ``(N,)`` bool (particles
    with no evidence for any pose), ``junk_score`` ``(N,)`` (their evidence in SDs of the good particles';
    NaN where not refined) and ``junk_rule`` (:mod:`cryofastar_core.refine.junk`; empty without a global pass).
    With several classes (:mod:`cryofastar_core.job.classes`): ``classes`` ``(N,)`` each particle's class
    (1..K by size, 0 where not refined), ``class_maps`` every class's ``(full, half1, half2)`` (``maps`` is
    class 1's; ``None`` as ``maps``, or for a class too small to refine)."""

    rotations: np.ndarray
    shifts: np.ndarray
    history: list[dict]
    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    junk: np.ndarray
    junk_score: np.ndarray
    junk_rule: dict = field(default_factory=dict)
    scale: dict = field(default_factory=dict)
    classes: np.ndarray | None = None
    class_maps: list[tuple | None] | None = None


def ab_initio_on_subset(particles: ParticleSet, idx: np.ndarray, scale: WorkScale, R: np.ndarray, s: np.ndarray,
                         half: np.ndarray, apix: float, rcfg: RefineConfig, device: torch.device,
                         progress: Progress | None, comm: Communicator | None) -> tuple[tuple, list[dict]]:
    """The global passes on the subset ``scale.subset`` (positions into ``idx``) at the ab initio box, until
    the map settles. Writes the subset's new poses into ``R`` ``(n, 3, 3)`` and ``s`` ``(n, 2)`` (input px);
    returns the two half maps brought to the local box, and the passes' history."""
    sub = idx[scale.subset]
    log.info("ab initio on %d of %d particles at box %d", len(sub), len(idx), scale.ab_initio_box)
    ab = ab_initio_at(particles, sub, scale.ab_initio_box, R[scale.subset], s[scale.subset], half[sub], apix, rcfg,
                      device, progress, comm)
    R[scale.subset], s[scale.subset] = ab.rotations, ab.shifts
    return padded_to((ab.half1, ab.half2), scale.local_box), [dict(h, particles="ab initio subset") for h in ab.history]


def ab_initio_at(particles: ParticleSet, idx: np.ndarray, box: int, R: np.ndarray, s: np.ndarray, half: np.ndarray,
                 apix: float, rcfg: RefineConfig, device: torch.device, progress: Progress | None,
                 comm: Communicator | None) -> RefineResult:
    """:func:`refine_at` as ab initio: the global passes from the poses ``R``, ``s`` until the map settles, no
    local iteration, no map given, the origin left where it is."""
    return refine_at(particles, idx, box, R, s, half, apix, replace(rcfg, iterations=0, centre_origin=False), None,
                     device, progress, comm)


def padded_to(maps, box: int) -> tuple:
    """Each map ``(d, d, d)`` Fourier-padded to ``box`` when smaller (unchanged otherwise)."""
    return tuple(fourier_pad_volume(m, box) if m.shape[-1] < box else m for m in maps)


def refine_at(particles: ParticleSet, idx: np.ndarray, box: int, R: np.ndarray, s: np.ndarray, half: np.ndarray,
               apix: float, rcfg: RefineConfig, initial: tuple | None, device: torch.device,
               progress: Progress | None, comm: Communicator | None) -> RefineResult:
    """:func:`~cryofastar_core.refine.driver.refine_poses` of the particles ``idx`` at ``box`` (images
    Fourier-cropped as read; shifts ``s`` in and out in input pixels, scaled to the box inside). The
    result's poses stay CPU float64 tensors, as :class:`~cryofastar_core.refine.driver.RefineResult` says;
    numpy arrays take them by assignment."""
    to_box = box / particles.box
    ctf = particles.ctf_params(idx).to(device) if particles.ctf is not None else None
    result = refine_poses(cropped_loader(particles, idx, box, device), ctf, apix / to_box, R,
                          np.asarray(s) * to_box, half, rcfg, device=device, progress=progress,
                          initial_half_maps=initial, comm=comm)
    result.shifts = result.shifts / to_box
    return result
