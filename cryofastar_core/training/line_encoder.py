"""Training of the common-lines encoder (:class:`~cryofastar_core.commonlines.learned.LineEncoder`).

Data: the training simulator (:class:`~.data.BatchSimulator`, the job's normalisation and phase flip)
on the ``train`` split, ``views`` views per sample, SNR log-uniform in ``[snr_min, snr_max]`` per step
(a fraction ``clean_fraction`` of steps clean), CTF and shifts as the ladder's cells have them. Each
sample goes through the estimator's own preparation (:func:`~cryofastar_core.commonlines.poser.prepare_views`),
the encoder, and the dense pair loss (:func:`~cryofastar_core.commonlines.learned.common_line_loss`).
Validation: the detection accuracy on fixed ``heldout`` draws, beside the identity encoder's (the
classical baseline) on the same draws.

Deterministic per step (seeded by ``(seed, step)``), so ``--resume`` continues exactly. The checkpoint
(encoder, optimiser, step) is rewritten every ``checkpoint_every`` steps; ``line_encoder.pt`` (fp16,
:func:`~cryofastar_core.commonlines.weights.save_line_encoder`) is exported with it.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from cryofastar_core.commonlines.config import CommonLinesConfig
from cryofastar_core.commonlines.learned import LineEncoder, common_line_loss, pair_scores, true_common_lines
from cryofastar_core.commonlines.poser import encode_lines, prepare_views, shift_ramps
from cryofastar_core.commonlines.weights import save_line_encoder
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.training.config import StageConfig
from cryofastar_core.training.data import TRAIN_STREAM, VALIDATION_STREAM, BatchSimulator, VolumeFTCache
from cryofastar_core.training.volumes import VolumeLibrary

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "line_encoder.pt"


@dataclass
class LineTrainConfig:
    """One run. ``train_lines``: in-plane angles of the training loss's score grid (coarser than the
    estimator's 360: the encoder does not depend on the angle, and the loss is ``O(L²)``)."""

    steps: int = 20000
    batch_size: int = 2
    views: int = 16
    snr_min: float = 0.2
    snr_max: float = 3.0
    clean_fraction: float = 0.1
    max_shift_px: float = 3.0
    lr: float = 1e-3
    train_lines: int = 180
    channels: int = 16
    depth: int = 4
    n_pseudo: int = 200
    seed: int = 0
    checkpoint_every: int = 100
    val_every: int = 200
    val_samples: int = 8
    val_snrs: tuple[float, ...] = (1.0, 0.5, 0.3)
    cache_dir: str | None = None  # the volume library's cache (default: ~/.cache/cryofastar/volumes)
    include_real: bool = True  # False: pseudo-molecules only (tests)


def sample_loss(encoder: LineEncoder, images: Tensor, rotations: Tensor, cfg: CommonLinesConfig,
                n_lines: int) -> tuple[Tensor, Tensor]:
    """Loss and detection accuracy of one sample's views ``(V, D, D)`` with true ``rotations`` ``(V, 3, 3)``."""
    prepared = prepare_views(images, cfg)
    features = encode_lines(prepared.masked, prepared.mask, cfg, encoder, n_lines)
    scores = pair_scores(features, shift_ramps(cfg, images.device))
    return common_line_loss(scores, true_common_lines(rotations), encoder.log_tau)


def _stage(cfg: LineTrainConfig, split: str, snr: float | None) -> StageConfig:
    return StageConfig(name=f"lines-{split}", steps=1, batch_size=cfg.batch_size, views_min=cfg.views,
                       views_max=cfg.views, snr_start=snr, snr_end=snr, ctf=snr is not None,
                       max_shift_px=cfg.max_shift_px if snr is not None else 0.0, volumes="library", split=split,
                       apix_min=1.5, apix_max=6.0)


def step_snr(cfg: LineTrainConfig, step: int) -> float | None:
    """The SNR of a training step (``None``: clean), a pure function of ``(seed, step)``."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    u = torch.rand(2, generator=g, dtype=torch.float64)
    if float(u[0]) < cfg.clean_fraction:
        return None
    return math.exp(math.log(cfg.snr_min) + (math.log(cfg.snr_max) - math.log(cfg.snr_min)) * float(u[1]))


def batch_loss(encoder: LineEncoder, sim: BatchSimulator, cfg: LineTrainConfig, lines_cfg: CommonLinesConfig,
               split: str, step: int, snr: float | None, stream: int, n_lines: int) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy over one batch of ``cfg.batch_size`` samples."""
    batch = sim.make_batch(_stage(cfg, split, snr), seed=cfg.seed, step=step, first_sample=0,
                           n_samples=cfg.batch_size, views=cfg.views, snr=snr, stream=stream,
                           ctf_correction=lines_cfg.ctf_correction)
    losses, hits = zip(*(sample_loss(encoder, batch.images[b], batch.rotations[b], lines_cfg, n_lines)
                         for b in range(cfg.batch_size)))
    return torch.stack(losses).mean(), torch.stack(hits).mean()


def validate(encoder: LineEncoder, sim: BatchSimulator, cfg: LineTrainConfig,
             lines_cfg: CommonLinesConfig) -> dict[str, float]:
    """Detection accuracy at each validation SNR on fixed heldout draws (the same every time)."""
    out = {}
    with torch.no_grad():
        for snr in cfg.val_snrs:
            hits = [batch_loss(encoder, sim, cfg, lines_cfg, "heldout", k, snr, VALIDATION_STREAM,
                               lines_cfg.n_lines)[1] for k in range(max(1, cfg.val_samples // cfg.batch_size))]
            out[f"hit_snr{snr:g}"] = float(torch.stack(hits).mean())
    return out


def _simulator(cfg: LineTrainConfig, split: str, box: int) -> BatchSimulator:
    n_pseudo = cfg.n_pseudo if split == "train" or not cfg.include_real else 0
    lib = VolumeLibrary(box=box, split=split, cache_dir=cfg.cache_dir, n_pseudo=n_pseudo, seed=0,
                        include_real=cfg.include_real)
    return BatchSimulator(VolumeFTCache(lib, "cpu", capacity=min(len(lib), 300)), box, "cpu")


def _save_checkpoint(out: Path, encoder: LineEncoder, opt: torch.optim.Optimizer, step: int,
                     cfg: LineTrainConfig, lines_cfg: CommonLinesConfig) -> None:
    state = {"encoder": encoder.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}}
    with atomic_output(out / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    save_line_encoder(out / WEIGHTS, encoder, lines_cfg, {"trained_steps": step, "training": state["config"],
                                                          "command": "cryofastar train-lines"})


def train_line_encoder(cfg: LineTrainConfig, out: Path, resume: bool = False,
                       max_steps: int | None = None) -> LineEncoder:
    """Train (or, with ``resume``, continue) in the run folder ``out``; returns the encoder. ``max_steps``:
    stop after this step (the schedule is ``cfg.steps``'s, so a resumed run continues exactly)."""
    out.mkdir(parents=True, exist_ok=True)
    lines_cfg = CommonLinesConfig()
    with torch.random.fork_rng():  # the starting weights are a function of the seed
        torch.manual_seed(cfg.seed)
        encoder = LineEncoder(len(lines_cfg.radii), cfg.channels, cfg.depth)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        _check_resumable(out / CHECKPOINT, state, cfg)
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("resumed at step %d", start)
    train_sim, val_sim = _simulator(cfg, "train", lines_cfg.box), _simulator(cfg, "heldout", lines_cfg.box)
    if start == 0:
        _log_metrics(out, 0, {**validate(encoder, val_sim, cfg, lines_cfg), "note": "identity (classical)"})
    t0 = time.perf_counter()
    end = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
    for step in range(start, end):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, hit = batch_loss(encoder, train_sim, cfg, lines_cfg, "train", step, step_snr(cfg, step),
                               TRAIN_STREAM, cfg.train_lines)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        if (step + 1) % 20 == 0:
            log.info("step %d loss %.4f hit %.3f lr %.2e (%.2f s/step)", step + 1, loss.item(), hit.item(), lr,
                     (time.perf_counter() - t0) / (step + 1 - start))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(out, encoder, opt, step + 1, cfg, lines_cfg)
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            _log_metrics(out, step + 1, validate(encoder, val_sim, cfg, lines_cfg))
    return encoder


def _check_resumable(path: Path, state: dict, cfg: LineTrainConfig) -> None:
    """A resumed run must build the encoder it saved: the same CNN depth and width."""
    saved = state.get("config", {})
    for field in ("depth", "channels"):
        if field in saved and saved[field] != getattr(cfg, field):
            raise InputError(path, field, f"the run was started with {field} {saved[field]}, "
                             f"this command asks for {getattr(cfg, field)}",
                             f"resume with --depth {saved[field]}, or start a new run folder" if field == "depth"
                             else "start a new run folder (the command trains the default width)")


def _log_metrics(out: Path, step: int, metrics: dict) -> None:
    log.info("validation at step %d: %s", step, metrics)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\n")
