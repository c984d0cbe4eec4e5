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
mass), which the model ladder measures far closer (bench/model_accuracy.py) than the line model's shift output.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a pose model runs on: its first parameter's or, parameter-free (common lines), its first buffer's."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


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

    The steps are the module docstring's: :func:`choose_reference`, :func:`pick_anchors`,
    :func:`plan_chunks`, then :func:`predict_chunks` (with the hand check) on this rank's batches and
    :func:`gather_chunks` across ranks. One generator (``cfg.seed``) draws, in this order, the
    candidate/auxiliary split and the order of the remaining particles.
    """
    comm = comm or Communicator()
    if n_particles < cfg.views:
        raise ValueError(f"need at least {cfg.views} particles for {cfg.views} views per pass, got {n_particles}")
    rng = np.random.default_rng(cfg.seed)
    n_aux = cfg.views - 1
    order = rng.permutation(n_particles)
    candidates = order[: min(cfg.candidates, n_particles - n_aux)]
    aux = order[len(candidates): len(candidates) + n_aux]
    device = model_device(model)

    choice = choose_reference(model, load, candidates, aux, cfg, comm, device)
    anchors, anchor_rot = pick_anchors(choice.first, aux, cfg.anchors)
    table = PoseTable.empty(n_particles)
    table.keep_first_pass(choice.reference, aux, choice.first)
    chunks = plan_chunks(rng, n_particles, choice.reference, aux, cfg)
    result = PoseEstimate(table.rotations, table.shifts, table.confidence, table.residual, choice.reference, anchors,
                          choice.scores.cpu().numpy(), n_chunks=len(chunks), reference_scoring_s=choice.seconds)
    run = ChunkRun(chunks, np.concatenate([[choice.reference], anchors]), anchor_rot, int(table.done.sum()))
    my_batches = chunk_batches(chunks, cfg.chunks_per_batch)[comm.rank:: comm.world_size]

    def tick() -> None:
        report_progress(progress, table, run.n_first, comm.world_size)

    def run_mine() -> None:
        tick()
        predict_chunks(model, load, my_batches, run, table, cfg, tick)

    if not comm.distributed:
        run_mine()
    else:
        gather_chunks(comm, run_mine, run, table)
        if progress:
            progress("poses", int(table.done.sum()), n_particles)
    assert table.done.all(), "every particle must receive a pose"
    result.flipped_chunks = run.flipped
    result.chunk_drift_deg = [run.drift[c] for c in sorted(run.drift)]
    if result.flipped_chunks:
        log.info("hand check: %d of %d chunks flipped to agree with the anchors", result.flipped_chunks, result.n_chunks)
    return result


# --- state shared by the steps --------------------------------------------------------------------
@dataclass
class PoseTable:
    """Every particle's result so far, filled in pass by pass; ``done`` marks who has one."""

    rotations: np.ndarray  # (N, 3, 3)
    shifts: np.ndarray  # (N, 2)
    confidence: np.ndarray  # (N,) confidence_score
    residual: np.ndarray  # (N,)
    done: np.ndarray  # (N,) bool

    @classmethod
    def empty(cls, n_particles: int) -> "PoseTable":
        return cls(np.zeros((n_particles, 3, 3)), np.zeros((n_particles, 2)), np.zeros(n_particles),
                   np.zeros(n_particles), np.zeros(n_particles, dtype=bool))

    def keep(self, idx: np.ndarray, pred: ViewPrediction, sel: slice | np.ndarray) -> None:
        """Store views ``sel`` of ``pred`` (per-view tensors ``(V, ...)``) as particles ``idx``."""
        self.rotations[idx] = pred.rotation[sel].double().cpu().numpy()
        self.shifts[idx] = pred.shift[sel].double().cpu().numpy()
        self.confidence[idx] = confidence_score(pred.confidence[sel])
        self.residual[idx] = pred.residual[sel].double().cpu().numpy()
        self.done[idx] = True

    def keep_first_pass(self, reference: int, aux: np.ndarray, first: ViewPrediction) -> None:
        """The reference (identity: the frame is the reference's, by definition) and the auxiliary
        particles ``aux`` ``(V-1,)`` from the winning pass ``first`` (views ``(V, ...)``)."""
        self.keep(np.array([reference]), first, slice(0, 1))
        self.rotations[reference] = np.eye(3)
        self.keep(aux, first, slice(1, None))

    def share(self) -> dict:
        """The particles done here, as plain arrays for :meth:`Communicator.gather`."""
        idx = np.flatnonzero(self.done)
        return {"idx": idx, "rotations": self.rotations[idx], "shifts": self.shifts[idx],
                "confidence": self.confidence[idx], "residual": self.residual[idx]}

    def merge(self, share: dict) -> None:
        """Take another rank's :meth:`share`."""
        idx = share["idx"]
        self.rotations[idx], self.shifts[idx] = share["rotations"], share["shifts"]
        self.confidence[idx], self.residual[idx] = share["confidence"], share["residual"]
        self.done[idx] = True


@dataclass
class ReferenceChoice:
    """Step 1's outcome: the reference particle, its pass and every candidate's score."""

    reference: int
    first: ViewPrediction  # the winning pass: per view (V, ...), view 0 the reference
    scores: torch.Tensor  # (K,) one per candidate
    seconds: float  # wall time of the scoring


@dataclass
class ChunkRun:
    """The chunk passes: the chunks (particle indices, new particles only), the particles every pass
    starts with (``fixed``: reference then anchors), the anchors' first-pass rotations ``(A, 3, 3)``
    and, per chunk number, the hand check's drift (degrees) and the number of chunks flipped."""

    chunks: list[np.ndarray]
    fixed: np.ndarray
    anchor_rot: torch.Tensor
    n_first: int  # particles posed by the first pass, before any chunk
    drift: dict[int, float] = field(default_factory=dict)
    flipped: int = 0


# --- 1. reference selection -----------------------------------------------------------------------
def choose_reference(model: torch.nn.Module, load: LoadFn, candidates: np.ndarray, aux: np.ndarray,
                     cfg: EstimatorConfig, comm: Communicator, device: torch.device) -> ReferenceChoice:
    """Score each candidate ``(K,)`` as the reference of a pass with the same auxiliary particles ``aux``
    ``(V-1,)``; the best has high mean confidence and a low median auxiliary Kabsch residual."""
    t_scoring = time.perf_counter()
    cand_pred = score_candidates(model, load, candidates, aux, cfg, comm, device)
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
    return ReferenceChoice(ref, first, scores, scoring_s)


def score_candidates(model: torch.nn.Module, load: LoadFn, candidates: np.ndarray, aux: np.ndarray,
                     cfg: EstimatorConfig, comm: Communicator, device: torch.device) -> list[ViewPrediction]:
    """One forward pass per candidate, ``cfg.chunks_per_batch`` candidates a batch, the batches dealt
    out to the ranks; every rank gets all predictions (each ``(b, V, ...)``) in batch order."""
    cand_batches = [candidates[s: s + cfg.chunks_per_batch] for s in range(0, len(candidates), cfg.chunks_per_batch)]

    def mine() -> list[tuple[int, ViewPrediction]]:
        return score_candidate_batches(model, load, cand_batches, aux, cfg, comm)

    scored = sorted((item for part in comm.gather(mine) for item in part), key=lambda t: t[0])
    return [p if not comm.distributed else _to_device(p, device) for _, p in scored]


def score_candidate_batches(model: torch.nn.Module, load: LoadFn, cand_batches: list[np.ndarray], aux: np.ndarray,
                            cfg: EstimatorConfig, comm: Communicator) -> list[tuple[int, ViewPrediction]]:
    """This rank's share of ``cand_batches``: ``(batch number, prediction)`` pairs (on the CPU when
    distributed, for the gather)."""
    mine = range(comm.rank, len(cand_batches), comm.world_size)
    if not mine:
        return []
    aux_images = load(aux)
    out = []
    # Scoring takes seconds to minutes before the first particle is done: say how far it is.
    log.info("scoring %d reference candidates, each one pass over %d views",
             sum(len(c) for c in cand_batches), cfg.views)
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


# --- 2. anchors -----------------------------------------------------------------------------------
def pick_anchors(first: ViewPrediction, aux: np.ndarray, n_anchors: int) -> tuple[np.ndarray, torch.Tensor]:
    """The ``n_anchors`` most reliable auxiliary views of the winning pass ``first`` (views ``(V, ...)``,
    ``aux`` ``(V-1,)``): their particle indices ``(A,)`` and rotations ``(A, 3, 3)``, the frame every
    chunk is checked against."""
    reliability = _standardise(first.confidence[1:]) - _standardise(first.residual[1:])
    top = torch.argsort(reliability, descending=True)[: n_anchors].cpu().numpy()
    return aux[top], first.rotation[1:][top]


# --- 3. chunks and the hand check -----------------------------------------------------------------
def plan_chunks(rng: np.random.Generator, n_particles: int, reference: int, aux: np.ndarray,
                cfg: EstimatorConfig) -> list[np.ndarray]:
    """Every particle not in the first pass, in ``rng``'s order, cut into chunks of
    ``views - 1 - anchors`` (the last one may be shorter)."""
    rest = np.setdiff1d(np.arange(n_particles), np.concatenate([[reference], aux]), assume_unique=False)
    rest = rng.permutation(rest)
    per_chunk = cfg.views - 1 - cfg.anchors
    return [rest[i: i + per_chunk] for i in range(0, len(rest), per_chunk)]


def chunk_batches(chunks: list[np.ndarray], per_batch: int) -> list[list[int]]:
    """Chunk numbers per forward batch: up to ``per_batch`` consecutive chunks of equal size."""
    out: list[list[int]] = []
    group: list[int] = []
    for c in range(len(chunks)):
        if group and len(chunks[c]) != len(chunks[group[0]]):
            out.append(group)
            group = []
        group.append(c)
        if len(group) == per_batch:
            out.append(group)
            group = []
    if group:
        out.append(group)
    return out


def predict_chunks(model: torch.nn.Module, load: LoadFn, batches: list[list[int]], run: ChunkRun, table: PoseTable,
                   cfg: EstimatorConfig, after_batch: Callable[[], None]) -> None:
    """Forward ``batches`` (chunk numbers) as ``[reference] + anchors + new particles`` and keep the new
    particles' poses in ``table``, hand-checked; ``after_batch()`` after each batch."""
    if not batches:
        return
    fixed = load(run.fixed)  # (1 + A, d, d), the same in every chunk
    # Read and preprocess the next batch while the model runs on this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        it = iter(batches)
        nxt = next(it, None)
        pending = pool.submit(load, np.concatenate([run.chunks[c] for c in nxt])) if nxt is not None else None
        while nxt is not None:
            group, new_images = nxt, pending.result()
            nxt = next(it, None)
            pending = pool.submit(load, np.concatenate([run.chunks[c] for c in nxt])) if nxt is not None else None
            predict_chunk_group(model, fixed, new_images, group, run, table, cfg)
            after_batch()


def predict_chunk_group(model: torch.nn.Module, fixed: torch.Tensor, new_images: torch.Tensor, group: list[int],
                        run: ChunkRun, table: PoseTable, cfg: EstimatorConfig) -> None:
    """One forward pass over the chunks ``group`` (equal sizes ``n``): ``fixed`` ``(1 + A, d, d)``,
    ``new_images`` ``(len(group) · n, d, d)``; each chunk is flipped to the anchors' hand if needed."""
    new_images = new_images.reshape(len(group), len(run.chunks[group[0]]), *new_images.shape[-2:])
    batch = torch.cat([fixed[None].expand(len(group), -1, -1, -1), new_images], dim=1)
    pred = predict_views(model, batch, cfg.weighting)
    for b, c in enumerate(group):
        p = ViewPrediction(pred.rotation[b], pred.shift[b], pred.confidence[b], pred.residual[b])
        p, was_flipped, run.drift[c] = _align_hand(p, run.anchor_rot, cfg.anchors)
        run.flipped += int(was_flipped)
        table.keep(run.chunks[c], p, slice(1 + cfg.anchors, None))


def gather_chunks(comm: Communicator, run_mine: Callable[[], None], run: ChunkRun, table: PoseTable) -> None:
    """Run this rank's chunks (``run_mine``), then take every rank's poses, flips and drifts, so every
    rank holds the whole result."""
    def my_share() -> dict:
        run_mine()
        return {**table.share(), "flipped": run.flipped, "drift": run.drift}

    shares = comm.gather(my_share)
    run.drift, run.flipped = {}, 0
    for share in shares:
        table.merge(share)
        run.flipped += share["flipped"]
        run.drift.update(share["drift"])


def report_progress(progress: Progress | None, table: PoseTable, n_first: int, world_size: int) -> None:
    """``progress("poses", ...)``: the first pass plus this rank's chunk particles times the ranks."""
    if progress:
        n_particles = len(table.done)
        mine = int(table.done.sum()) - n_first
        progress("poses", min(n_particles, n_first + mine * world_size), n_particles)


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
