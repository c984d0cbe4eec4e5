"""The data-only verdict on a set of posed particles, as the job judges every map it writes (class 1, each
further class) and every class it refines: :func:`assess_quality`; and, for a one-class run, whether its
particles hold two populations: :func:`split_test`."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import numpy as np
import torch

from cryofastar_core.evaluation.heterogeneity import SplitTest, split_reproducibility
from cryofastar_core.evaluation.verdict import PoseQuality, assess_poses, judging_mask
from cryofastar_core.io import ParticleSet
from cryofastar_core.job.work_scale import AB_INITIO_BOX, cropped_loader
from cryofastar_core.physics.fourier import fourier_crop_volume
from cryofastar_core.refine.classes import classify_poses
from cryofastar_core.refine.config import RefineConfig

log = logging.getLogger(__name__)

# The verdict's thresholds were calibrated on box-64 particles (bench/results/2026-12-05-quality-calibration.md).
JUDGING_BOX = AB_INITIO_BOX


def assess_quality(particles: ParticleSet, idx: np.ndarray, rotations: np.ndarray, shifts: np.ndarray,
                   half: np.ndarray, half_maps: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   ) -> PoseQuality:
    """The data-only pose-quality verdict (:mod:`cryofastar_core.evaluation.verdict`) of the particles ``idx``
    (indices into ``particles``) at their poses ``rotations`` ``(n, 3, 3)``, ``shifts`` ``(n, 2)`` (input px)
    in half sets ``half`` ``(n,)``, against ``half_maps``; judged at the box it was calibrated at
    (``JUDGING_BOX``, or the input box when smaller): images and half maps Fourier-cropped, shifts and pixel
    size scaled (at box 256 the full-box verdict took longer than the reconstruction,
    ``bench/results/2026-12-06-scale.md``)."""
    box, to_box = _judging_box(particles)
    log.info("judging the poses of up to %d particles against the half maps (box %d)", min(len(idx), 2000), box)
    load = cropped_loader(particles, idx, box, torch.device("cpu"))
    ctf = particles.ctf_params(idx) if particles.ctf is not None else None
    maps = tuple(fourier_crop_volume(m, box) if box < particles.box else m for m in half_maps)
    return assess_poses(load, ctf, float(particles.apix[0]) / to_box, np.asarray(rotations),
                        np.asarray(shifts) * to_box, np.asarray(half), maps, device=device)


_RANK = {"failed": 0, "doubtful": 1, "ok": 2}


def judge_result(particles: ParticleSet, members: np.ndarray, result, half: np.ndarray, device: torch.device,
                 rows: np.ndarray | None = None) -> PoseQuality:
    """The verdict on ``members``' poses in a refinement ``result`` (its ``rotations``, ``shifts`` in input px
    and half maps) with half sets ``half`` over all particles; only the ``rows`` of ``members`` (a bool
    selection, e.g. those not found to be junk) when given."""
    rows = np.ones(len(members), dtype=bool) if rows is None else rows
    return assess_quality(particles, members[rows], result.rotations.numpy()[rows], result.shifts.numpy()[rows],
                          half[members[rows]], (result.half1, result.half2), device)


def judged_key(quality: PoseQuality) -> tuple[int, float]:
    """How two verdicts on the same particles' poses compare: by verdict, then by sharpness (none counts as
    -1, below any measured one)."""
    return _RANK[quality.verdict], quality.sharpness if np.isfinite(quality.sharpness) else -1.0


Result = TypeVar("Result")


def best_of_starts(attempt: Callable[[int, PoseQuality | None], Result], judge: Callable[[Result], PoseQuality],
                   starts: int, told: Callable[[int, PoseQuality], None],
                   first: tuple[Result, PoseQuality] | None = None) -> Result:
    """The best judged (:func:`judged_key`) of ``first`` (a result and its verdict, when given) and up to
    ``starts`` further results ``attempt(k, best verdict so far)``, ``k`` = 1..``starts``, each judged by
    ``judge`` and ``told(k, verdict)``; no further start once a result is judged ``ok``. The one policy of
    every restart from random poses (a one-class refinement, a class's seed, a class refined afresh)."""
    best, quality = first if first is not None else (None, None)
    for k in range(1, starts + 1):
        if quality is not None and quality.verdict == "ok":
            break
        result = attempt(k, quality)
        judged = judge(result)
        told(k, judged)
        if quality is None or judged_key(judged) > judged_key(quality):
            best, quality = result, judged
    return best


# The split test classifies a sample of the kept particles at the judging box, from their final poses, by a
# few class passes on a coarse grid (30 degrees, shifts within 1 px: mostly each particle's pose is kept and
# only its class is chosen). On the adenylate-kinase mixture that separates the conformations (90 % right) as
# well as the 15-degree grid, in 10 s instead of 30 s for 2,000 particles (bench/results/2026-12-06-classes.md,
# session 16).
SPLIT_PARTICLES = 2000
SPLIT_PASSES = 4
SPLIT_STEP_DEG = 30.0
SPLIT_SHIFT_RADIUS_PX = 1.0
SPLIT_MIN_PARTICLES = 200  # fewer: the class maps are too noisy for a judgement


def split_test(particles: ParticleSet, idx: np.ndarray, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
               device: torch.device, seed: int = 0) -> SplitTest | None:
    """Whether the particles ``idx`` (at poses ``rotations`` ``(n, 3, 3)``, ``shifts`` ``(n, 2)`` input px, half
    sets ``half`` ``(n,)``) split reproducibly into two populations
    (:mod:`cryofastar_core.evaluation.heterogeneity`): up to :data:`SPLIT_PARTICLES` of them, drawn with
    ``seed``, classified into two classes by :data:`SPLIT_PASSES` coarse class passes at the judging box; None
    for fewer than :data:`SPLIT_MIN_PARTICLES`."""
    if len(idx) < SPLIT_MIN_PARTICLES:
        return None
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(idx))[:SPLIT_PARTICLES])
    box, to_box = _judging_box(particles)
    log.info("testing whether %d of the particles split into two populations (2 classes, box %d)", len(pick), box)
    chosen = idx[pick]
    ctf = particles.ctf_params(chosen) if particles.ctf is not None else None
    # Read and cropped once (2,000 images at box 64: 33 MB), not once per class pass.
    images = cropped_loader(particles, chosen, box, torch.device("cpu"))(np.arange(len(chosen)))
    found = classify_poses(lambda local: images[torch.as_tensor(local)], ctf,
                           float(particles.apix[0]) / to_box, np.asarray(rotations)[pick],
                           np.asarray(shifts)[pick] * to_box, np.asarray(half)[pick], 2,
                           RefineConfig(global_passes=SPLIT_PASSES, global_step_deg=SPLIT_STEP_DEG,
                                        global_shift_radius_px=SPLIT_SHIFT_RADIUS_PX), device)
    sizes = np.bincount(found.labels.numpy(), minlength=2).tolist()
    return split_reproducibility(found.maps[0], found.maps[1], judging_mask(box, found.maps[0][0].device), sizes)


def _judging_box(particles: ParticleSet) -> tuple[int, float]:
    """The box the verdict and the split test work at (:data:`JUDGING_BOX`, or the input box when smaller)
    and its ratio to the input box."""
    box = min(particles.box, JUDGING_BOX)
    return box, box / particles.box
