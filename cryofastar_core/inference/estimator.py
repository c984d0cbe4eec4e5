"""Poses for N >> views particles in one shared frame.

1. Score ``candidates`` reference particles, each in one forward pass with the same fixed auxiliary set;
   keep the best by mean confidence and Kabsch residual.
2. From that pass, keep the ``anchors`` most reliable auxiliary particles and their rotations.
3. Every later forward pass is ``[reference] + anchors + new particles``; since the reference's FPM is the
   z = 0 plane, every chunk predicts in the same frame.
4. The network is trained hand-invariantly, so a chunk may come out mirrored: compare its anchors with
   the first pass and flip the chunk (``Q -> F Q F``) when the mirror fits better.

Rotations returned are internal rotations (image -> map frame) of a map whose frame is the reference
particle's (the reference gets the identity); shifts are in model-box pixels, each image's own centroid
(:func:`~cryofastar_core.physics.centre.centroid_shifts`: the map's origin at the molecule's centre of
mass), which the model card measured far closer than the line model's shift output.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from cryofastar_core.geometry import mirror_rotations, rotation_angle_deg
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.model.fpm import denormalize
from cryofastar_core.model.kabsch import kabsch
from cryofastar_core.physics.centre import centroid_shifts
from cryofastar_core.runtime.progress import Progress

log = logging.getLogger(__name__)

LoadFn = Callable[[np.ndarray], torch.Tensor]
"""Particle indices ``(n,)`` -> preprocessed model input ``(n, d, d)`` on the model's device."""


@dataclass
class EstimatorConfig:
    views: int = 128
    candidates: int = 64
    anchors: int = 8
    chunks_per_batch: int = 4
    weighting: str = "confidence"  # "confidence" (weighted Kabsch) or "uniform" (plain Kabsch)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 4:
            raise ValueError("views must be at least 4 (reference + anchors + new particles)")
        if not 1 <= self.anchors <= self.views - 2:
            raise ValueError("anchors must be between 1 and views - 2")
        if self.weighting not in ("confidence", "uniform"):
            raise ValueError("weighting must be 'confidence' or 'uniform'")


@dataclass
class ViewPrediction:
    rotation: torch.Tensor  # (..., 3, 3) Q: view -> reference frame
    shift: torch.Tensor  # (..., 2) model-box pixels
    confidence: torch.Tensor  # (...,) mean confidence over pixels
    residual: torch.Tensor  # (...,) Kabsch residual (grid units)


@dataclass
class PoseEstimate:
    rotations: np.ndarray  # (N, 3, 3)
    shifts: np.ndarray  # (N, 2) model-box pixels
    confidence: np.ndarray  # (N,) in [0, 1): confidence_score of the mean per-pixel confidence
    residual: np.ndarray  # (N,)
    reference: int
    anchors: np.ndarray
    candidate_scores: np.ndarray
    flipped_chunks: int = 0
    n_chunks: int = 0
    chunk_drift_deg: list[float] = field(default_factory=list)
    reference_scoring_s: float = 0.0  # wall time of step 1 (choosing the reference)


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: torch.Tensor, weighting: str = "confidence") -> ViewPrediction:
    """Forward ``(B, V, d, d)`` images and recover each view's rotation by (weighted) Kabsch; its
    shift is the image's centroid."""
    box = images.shape[-1]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else torch.autocast("cpu", enabled=False)
    with autocast:
        out = model(images)
    xyz = denormalize(out.xyz.float())
    conf = out.conf.float()
    k = kabsch(xyz, conf if weighting == "confidence" else None, box, out.grid)
    shift = centroid_shifts(images.reshape(-1, box, box).float()).reshape(*images.shape[:-2], 2)
    return ViewPrediction(k.rotation, shift, conf.mean(dim=(-1, -2)), k.residual)


def confidence_score(mean_conf: torch.Tensor) -> np.ndarray:
    """The one user-facing confidence scale, ``1 - 1/C`` in [0, 1), from a view's mean per-pixel
    confidence ``C >= 1`` (the model's ``1 + exp``): shared by the log, the histogram, the STAR column
    and ``min_confidence``. Monotonic, so rankings and ``keep_fraction`` are unchanged."""
    return 1.0 - 1.0 / np.maximum(mean_conf.double().cpu().numpy(), 1.0)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-8) if x.numel() > 1 else torch.zeros_like(x)


def estimate_poses(model: torch.nn.Module, load: LoadFn, n_particles: int, cfg: EstimatorConfig,
                   progress: Progress | None = None, comm: Communicator | None = None) -> PoseEstimate:
    """Estimate poses for ``n_particles`` particles read through ``load``.

    ``progress("poses", done, n_particles)`` is called with the number of particles finished after each batch.

    With a distributed ``comm`` (several ranks), every rank must call this with the same arguments: the
    reference candidates and then the chunk batches are dealt out to the ranks batch by batch (so each
    forward pass holds exactly the images it would hold in one process), the results are gathered, and
    every rank returns the same complete estimate. ``progress`` then counts this rank's share times the
    number of ranks (an estimate of the whole).
    """
    comm = comm or Communicator()
    if n_particles < cfg.views:
        raise ValueError(f"need at least {cfg.views} particles for {cfg.views} views per pass, got {n_particles}")
    rng = np.random.default_rng(cfg.seed)
    n_aux = cfg.views - 1
    order = rng.permutation(n_particles)
    candidates = order[: min(cfg.candidates, n_particles - n_aux)]
    aux = order[len(candidates): len(candidates) + n_aux]
    device = next(model.parameters()).device

    # 1. Reference selection: each candidate with the same auxiliary set; candidate batches shared out.
    cand_batches = [candidates[s: s + cfg.chunks_per_batch] for s in range(0, len(candidates), cfg.chunks_per_batch)]

    def score_my_candidates() -> list[tuple[int, ViewPrediction]]:
        mine = range(comm.rank, len(cand_batches), comm.world_size)
        if not mine:
            return []
        aux_images = load(aux)
        out = []
        # Scoring takes seconds to minutes before the first particle is done: say how far it is.
        log.info("scoring %d reference candidates, each one pass over %d views", len(candidates), cfg.views)
        every = max(1, len(mine) // 4)
        for k, b in enumerate(mine, start=1):
            if k % every == 0 and k < len(mine):
                log.info("reference candidates: %d of %d batches scored", k, len(mine))
            idx = cand_batches[b]
            ref_images = load(idx)
            batch = torch.cat([ref_images[:, None], aux_images[None].expand(len(idx), -1, -1, -1)], dim=1)
            pred = predict_views(model, batch, cfg.weighting)
            out.append((b, _to_device(pred, "cpu") if comm.distributed else pred))
        return out

    t_scoring = time.perf_counter()
    scored = sorted((item for part in comm.gather(score_my_candidates) for item in part), key=lambda t: t[0])
    cand_pred = [p if not comm.distributed else _to_device(p, device) for _, p in scored]
    conf = torch.cat([p.confidence for p in cand_pred])  # (K, V)
    resid = torch.cat([p.residual for p in cand_pred])
    scores = _standardise(conf.mean(1)) - _standardise(resid[:, 1:].median(1).values)
    best = int(scores.argmax())
    ref = int(candidates[best])
    first = ViewPrediction(*(torch.cat([getattr(p, f) for p in cand_pred])[best]
                             for f in ("rotation", "shift", "confidence", "residual")))
    scoring_s = time.perf_counter() - t_scoring
    log.info("reference particle %d chosen from %d candidates (mean confidence %.3f, %.1f s)", ref, len(candidates),
             float(confidence_score(conf[best]).mean()), scoring_s)

    # 2. Anchors: the most reliable auxiliary views of the winning pass.
    reliability = _standardise(first.confidence[1:]) - _standardise(first.residual[1:])
    top = torch.argsort(reliability, descending=True)[: cfg.anchors].cpu().numpy()
    anchors = aux[top]
    anchor_rot = first.rotation[1:][top]  # (A, 3, 3), the frame every chunk is checked against

    rotations = np.zeros((n_particles, 3, 3))
    shifts = np.zeros((n_particles, 2))
    confidence = np.zeros(n_particles)
    residual = np.zeros(n_particles)
    done = np.zeros(n_particles, dtype=bool)

    def keep(idx: np.ndarray, pred: ViewPrediction, sel: slice | np.ndarray) -> None:
        rotations[idx] = pred.rotation[sel].double().cpu().numpy()
        shifts[idx] = pred.shift[sel].double().cpu().numpy()
        confidence[idx] = confidence_score(pred.confidence[sel])
        residual[idx] = pred.residual[sel].double().cpu().numpy()
        done[idx] = True

    keep(np.array([ref]), first, slice(0, 1))
    rotations[ref] = np.eye(3)  # the frame is the reference's, by definition
    keep(aux, first, slice(1, None))
    n_first = int(done.sum())

    # 3. Chunks of new particles: everything not yet in the first pass.
    rest = np.setdiff1d(np.arange(n_particles), np.concatenate([[ref], aux]), assume_unique=False)
    rest = rng.permutation(rest)
    per_chunk = cfg.views - 1 - cfg.anchors
    chunks = [rest[i: i + per_chunk] for i in range(0, len(rest), per_chunk)]
    result = PoseEstimate(rotations, shifts, confidence, residual, ref, anchors, scores.cpu().numpy(), n_chunks=len(chunks),
                          reference_scoring_s=scoring_s)

    def batches() -> Iterator[list[int]]:
        """Chunk numbers per forward batch (chunks of equal size only)."""
        group: list[int] = []
        for c in range(len(chunks)):
            if group and len(chunks[c]) != len(chunks[group[0]]):
                yield group
                group = []
            group.append(c)
            if len(group) == cfg.chunks_per_batch:
                yield group
                group = []
        if group:
            yield group

    my_batches = list(batches())[comm.rank:: comm.world_size]
    drift: dict[int, float] = {}
    flipped = [0]

    def tick() -> None:
        if progress:
            mine = int(done.sum()) - n_first
            progress("poses", min(n_particles, n_first + mine * comm.world_size), n_particles)

    def run_my_chunks() -> None:
        if not my_batches:
            return
        fixed = load(np.concatenate([[ref], anchors]))  # (1 + A, d, d), the same in every chunk
        # Read and preprocess the next batch while the model runs on this one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            it = iter(my_batches)
            nxt = next(it, None)
            pending = pool.submit(load, np.concatenate([chunks[c] for c in nxt])) if nxt is not None else None
            while nxt is not None:
                group, new_images = nxt, pending.result()
                nxt = next(it, None)
                pending = pool.submit(load, np.concatenate([chunks[c] for c in nxt])) if nxt is not None else None
                new_images = new_images.reshape(len(group), len(chunks[group[0]]), *new_images.shape[-2:])
                batch = torch.cat([fixed[None].expand(len(group), -1, -1, -1), new_images], dim=1)
                pred = predict_views(model, batch, cfg.weighting)
                for b, c in enumerate(group):
                    p = ViewPrediction(pred.rotation[b], pred.shift[b], pred.confidence[b], pred.residual[b])
                    p, was_flipped, drift[c] = _align_hand(p, anchor_rot, cfg.anchors)
                    flipped[0] += int(was_flipped)
                    keep(chunks[c], p, slice(1 + cfg.anchors, None))
                tick()

    if not comm.distributed:
        tick()
        run_my_chunks()
    else:
        def my_share() -> dict:
            tick()
            run_my_chunks()
            idx = np.flatnonzero(done)
            return {"idx": idx, "rotations": rotations[idx], "shifts": shifts[idx], "confidence": confidence[idx],
                    "residual": residual[idx], "flipped": flipped[0], "drift": drift}

        shares = comm.gather(my_share)
        drift, flipped[0] = {}, 0
        for share in shares:
            idx = share["idx"]
            rotations[idx], shifts[idx] = share["rotations"], share["shifts"]
            confidence[idx], residual[idx] = share["confidence"], share["residual"]
            done[idx] = True
            flipped[0] += share["flipped"]
            drift.update(share["drift"])
        if progress:
            progress("poses", int(done.sum()), n_particles)
    assert done.all(), "every particle must receive a pose"
    result.flipped_chunks = flipped[0]
    result.chunk_drift_deg = [drift[c] for c in sorted(drift)]
    if result.flipped_chunks:
        log.info("hand check: %d of %d chunks flipped to agree with the anchors", result.flipped_chunks, result.n_chunks)
    return result


def _to_device(pred: ViewPrediction, device: torch.device | str) -> ViewPrediction:
    return ViewPrediction(*(getattr(pred, f).to(device) for f in ("rotation", "shift", "confidence", "residual")))


def _align_hand(pred: ViewPrediction, anchor_rot: torch.Tensor, n_anchors: int) -> tuple[ViewPrediction, bool, float]:
    """Flip a chunk (Q -> F Q F) when its anchors agree better with the first pass mirrored.

    Returns the (possibly flipped) prediction, whether it was flipped, and the median angle (degrees)
    between the chunk's anchors and the first pass's (a health check: near 0 when frames agree).
    """
    q = pred.rotation[1: 1 + n_anchors].to(anchor_rot.dtype)
    e_same = torch.linalg.matrix_norm(q - anchor_rot).sum()
    e_flip = torch.linalg.matrix_norm(mirror_rotations(q) - anchor_rot).sum()
    rotation = pred.rotation
    flipped = bool(e_flip < e_same)
    if flipped:
        rotation = mirror_rotations(rotation)
        q = mirror_rotations(q)
    drift = float(rotation_angle_deg(q, anchor_rot).median())
    return ViewPrediction(rotation, pred.shift, pred.confidence, pred.residual), flipped, drift
