"""Poses through 2D class averages: pose the averages, then give each particle its class's pose.

Raw particles at SNR 0.01–0.1 are beyond any common-lines estimator; the class averages a 2D
classification makes of them (tens to hundreds of particles each) are not. So when the particles
carry a RELION 2D classification (:func:`cryofastar_core.io.class2d.find_class_averages`), the job
poses the averages of the classes that have members (through the same estimator and pose model
interface as particles: chunks, anchors, hand check), then composes each particle's pose from its
class's and its own in-plane angle and shift (:func:`cryofastar_core.geometry.compose_class_pose`).
Refinement, reconstruction and the verdict then run on the particles as on any other estimate.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from cryofastar_core.geometry import compose_class_pose
from cryofastar_core.inference.estimator import EstimatorConfig, estimate_poses
from cryofastar_core.inference.pose_model import load_pose_model, pose_model_identity, reference_candidates
from cryofastar_core.inference.preprocess import model_px_to_input_px, to_model_input
from cryofastar_core.io import ParticleSet
from cryofastar_core.io.class2d import ClassAverages
from cryofastar_core.job.config import JobConfig
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)

# A floor by judgement, not measured: each pair's angle is voted by the other views, and with fewer than
# four voters one wrong common line outvotes the rest.
MIN_CLASSES = 6
# The confidence of a common-lines pose is its share of agreeing votes: 0.8-0.9 on clean projections, 0.25-0.3
# on seven RELION class averages of an SNR 3 set that were posed to ~2 degrees (two of them mixing views),
# 0.13 on the averages of SNR 0.1 particles that posed nothing (docs/model-history.md, session 10;
# bench/results/2026-12-06-class-averages.md). Below this the log says the averages disagree.
LOW_SUPPORT = 0.2


def estimate_from_class_averages(cfg: JobConfig, particles: ParticleSet, classes: ClassAverages,
                                 device: torch.device, progress: Progress | None = None) -> dict:
    """Every particle's pose from its class average's: the same dict as the feed-forward estimate, plus the
    classes posed (``class_numbers``, ``class_rotations``, ``class_shifts`` in input px), the averages'
    STAR (``class_source``) and the pose model's identity as JSON (``class_pose_model``). Every rank
    computes the same (a few hundred images at most)."""
    n_classes = len(classes.numbers)
    if n_classes < MIN_CLASSES:
        raise InputError(classes.source, "rlnClassNumber", f"only {n_classes} class averages have particles; the "
                         f"class-average route needs at least {MIN_CLASSES}",
                         "run Class2D with more classes (50 is usual), or pass --class-averages off")
    model = load_pose_model(cfg.class_poses, device=device)
    model_box = int(model.cfg.box)
    # an average has its members' contrast: take the sign of one member per class
    sign = particles.sign[[int(np.flatnonzero(classes.member == c)[0]) for c in range(n_classes)]]

    def load(indices: np.ndarray) -> torch.Tensor:
        return to_model_input(classes.images[indices], model_box, sign[indices], device=device)

    views = min(cfg.views, n_classes)
    ecfg = EstimatorConfig(views=views, candidates=min(reference_candidates(model, cfg.candidates), n_classes),
                           anchors=min(cfg.anchors, views - 2),
                           chunks_per_batch=cfg.chunks_per_batch, weighting=cfg.weighting, seed=cfg.seed)
    log.info("class-average route: posing %d class averages (%s) with %s", n_classes, classes.source, cfg.class_poses)
    est = estimate_poses(model, load, n_classes, ecfg, progress=progress)
    support = float(np.median(est.confidence))
    (log.warning if support < LOW_SUPPORT else log.info)(
        "class averages: median agreement of their poses %.2f (0-1)%s", support,
        ": the averages disagree, as averages that mix views do; check the 2D classes" if support < LOW_SUPPORT else "")
    class_shift = est.shifts * model_px_to_input_px(particles.box, model_box)
    m = classes.member
    rotations, shifts = compose_class_pose(torch.from_numpy(est.rotations[m]), torch.from_numpy(class_shift[m]),
                                           torch.from_numpy(classes.in_plane), torch.from_numpy(classes.shifts))
    return {"rotations": rotations.numpy(), "shifts": shifts.numpy(), "confidence": est.confidence[m],
            "residual": est.residual[m], "reference": int(np.flatnonzero(m == est.reference)[0]),
            "anchors": np.array([np.flatnonzero(m == a)[0] for a in est.anchors]),
            "flipped_chunks": est.flipped_chunks, "n_chunks": est.n_chunks,
            "candidate_scores": est.candidate_scores, "reference_scoring_s": est.reference_scoring_s,
            "class_numbers": classes.numbers, "class_rotations": est.rotations, "class_shifts": class_shift,
            "class_source": str(classes.source), "class_support": support,
            "class_pose_model": json.dumps(pose_model_identity(cfg.class_poses, model), default=str)}

