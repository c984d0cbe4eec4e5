"""The poses of a run: feed-forward estimate, selection by confidence, refinement of the kept particles,
and the data-only verdict on them. Each takes the particle set and returns arrays over all particles."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from cryofastar_core.evaluation.verdict import PoseQuality, assess_poses
from cryofastar_core.inference.estimator import EstimatorConfig, estimate_poses
from cryofastar_core.inference.preprocess import model_px_to_input_px, to_model_input
from cryofastar_core.io import ParticleSet
from cryofastar_core.job.config import JobConfig
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)


def estimate_feed_forward(cfg: JobConfig, particles: ParticleSet, model: torch.nn.Module, model_box: int,
                          device: torch.device, progress: Progress | None, comm: Communicator | None = None) -> dict:
    n = len(particles)

    ctf_correction = model.cfg.ctf_correction
    use_ctf = ctf_correction != "none" and particles.ctf is not None

    def load(indices: np.ndarray) -> torch.Tensor:
        images = particles.read_images(indices)
        return to_model_input(images, model_box, particles.sign[indices], device=device,
                              ctf=particles.ctf_params(indices) if use_ctf else None,
                              apix=torch.as_tensor(particles.apix[indices]), ctf_correction=ctf_correction)

    ecfg = EstimatorConfig(views=cfg.views, candidates=cfg.candidates, anchors=cfg.anchors,
                           chunks_per_batch=cfg.chunks_per_batch, weighting=cfg.weighting, seed=cfg.seed)
    est = estimate_poses(model, load, n, ecfg, progress=progress, comm=comm)
    scale = model_px_to_input_px(particles.box, model_box)
    if est.chunk_drift_deg:
        log.info("frame health: median anchor disagreement between chunks %.2f deg", float(np.median(est.chunk_drift_deg)))
    return {"rotations": est.rotations, "shifts": est.shifts * scale, "confidence": est.confidence,
            "residual": est.residual, "reference": est.reference, "anchors": est.anchors,
            "flipped_chunks": est.flipped_chunks, "n_chunks": est.n_chunks,
            "candidate_scores": est.candidate_scores, "reference_scoring_s": est.reference_scoring_s}


def kept_by_confidence(cfg: JobConfig, confidence: np.ndarray) -> np.ndarray:
    keep = np.ones(len(confidence), dtype=bool)
    if cfg.min_confidence is not None:
        keep &= confidence >= cfg.min_confidence
    if cfg.keep_fraction is not None and cfg.keep_fraction < 1:
        # Exactly the k most confident (a stable rank, so ties cannot keep more than asked for).
        k = max(2, int(round(cfg.keep_fraction * len(confidence))))
        top = np.argsort(-confidence, kind="stable")[:k]
        ranked = np.zeros_like(keep)
        ranked[top] = True
        keep &= ranked
    if keep.sum() < 2:
        raise InputError(None, "keep_fraction, min_confidence", "fewer than 2 particles would be kept",
                         "keep a larger fraction or lower the confidence threshold")
    return keep


@dataclass
class Refined:
    """What the refine stage gives the run, over all ``N`` particles: new ``rotations`` ``(N, 3, 3)`` and
    ``shifts`` ``(N, 2)`` (unchanged where not refined), the refinement ``history``, its last
    ``(full, half1, half2)`` maps (without the junk unless ``keep_junk``), ``junk`` ``(N,)`` bool (particles
    with no evidence for any pose), ``junk_score`` ``(N,)`` (their evidence in SDs of the good particles';
    NaN where not refined) and ``junk_rule`` (:mod:`cryofastar_core.refine.junk`; empty without a global pass)."""

    rotations: np.ndarray
    shifts: np.ndarray
    history: list[dict]
    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    junk: np.ndarray
    junk_score: np.ndarray
    junk_rule: dict = field(default_factory=dict)


def refine_kept(cfg: JobConfig, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                keep: np.ndarray, apix: float, device: torch.device, progress: Progress | None = None,
                comm: Communicator | None = None) -> Refined:
    """Refine the ``keep`` particles' poses (:func:`cryofastar_core.refine.driver.refine_poses`), finding junk
    in the global passes; ``cfg.keep_junk`` keeps it in the maps."""
    from cryofastar_core.refine.driver import RefineConfig, refine_poses

    idx = np.flatnonzero(keep)
    ctf = particles.ctf_params(idx).to(device) if particles.ctf is not None else None
    rcfg = RefineConfig(iterations=cfg.refine_iters, exclude_junk=not cfg.keep_junk,
                        global_step_deg=RefineConfig.global_step_deg if cfg.refine_global else None)
    result = refine_poses(partial(_signed_images, particles, idx, device), ctf, apix, rotations[idx], shifts[idx],
                          half[idx], rcfg, device=device, progress=progress, comm=comm)
    rotations, shifts = rotations.copy(), shifts.copy()
    rotations[idx] = np.asarray(result.rotations)
    shifts[idx] = np.asarray(result.shifts)
    junk = np.zeros(len(keep), dtype=bool)
    score = np.full(len(keep), np.nan)
    if result.junk is not None:
        junk[idx] = result.junk.numpy()
        score[idx] = result.junk_score.numpy()
    return Refined(rotations, shifts, [dict(h) for h in result.history], (result.full, result.half1, result.half2),
                   junk, score, dict(result.junk_rule))


def _signed_images(particles: ParticleSet, idx: np.ndarray, device: torch.device, local: np.ndarray) -> torch.Tensor:
    """Images ``(n, D, D)`` of the particles ``idx[local]``, contrast sign applied, on ``device``."""
    g = idx[local]
    return torch.as_tensor(particles.read_images(g) * particles.sign[g, None, None], dtype=torch.float32, device=device)


def assess_quality(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                   keep: np.ndarray, half_maps: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   ) -> PoseQuality:
    """The data-only pose-quality verdict of the ``keep`` particles (:mod:`cryofastar_core.evaluation.verdict`)."""
    idx = np.flatnonzero(keep)
    log.info("judging the poses of up to %d particles against the half maps", min(len(idx), 2000))
    load = partial(_signed_images, particles, idx, torch.device("cpu"))
    ctf = particles.ctf_params(idx) if particles.ctf is not None else None
    return assess_poses(load, ctf, float(particles.apix[0]), rotations[idx], shifts[idx], half[idx], half_maps,
                        device=device)

