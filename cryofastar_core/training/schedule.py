"""The curriculum clock: which stage a global step is in, its learning rate, view count and SNR.

Everything is a pure function of the global step (and the run seed), so a resumed run, or any
distributed rank, computes the same values without carrying scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryofastar_core.training.config import StageConfig


@dataclass(frozen=True)
class StagePosition:
    """``index`` into the stage list, the ``stage``, and the step inside it (``0 <= local_step < stage.steps``)."""

    index: int
    stage: StageConfig
    local_step: int


def stage_at(stages: list[StageConfig], step: int) -> StagePosition:
    """The stage that global ``step`` (0-based) falls in; past the end it stays in the last stage."""
    start = 0
    for i, s in enumerate(stages):
        if step < start + s.steps:
            return StagePosition(i, s, step - start)
        start += s.steps
    return StagePosition(len(stages) - 1, stages[-1], stages[-1].steps - 1)


def stage_start(stages: list[StageConfig], index: int) -> int:
    """Global step at which stage ``index`` begins."""
    return sum(s.steps for s in stages[:index])


def learning_rate(stage: StageConfig, local_step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at the stage's end."""
    if local_step < stage.warmup_steps:
        return stage.lr * (local_step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (local_step - stage.warmup_steps) / span)
    return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1.0 + math.cos(math.pi * progress))


def snr_at(stage: StageConfig, local_step: int) -> float | None:
    """Log-linear ramp from ``snr_start`` to ``snr_end`` over the stage; ``None`` for a clean stage."""
    if stage.snr_start is None or stage.snr_end is None:
        return None
    frac = local_step / max(1, stage.steps - 1)
    return float(math.exp((1 - frac) * math.log(stage.snr_start) + frac * math.log(stage.snr_end)))


def max_tilt_at(stage: StageConfig, local_step: int) -> float:
    """Linear ramp from ``max_tilt_start`` to ``max_tilt_end`` (degrees) over the stage."""
    frac = local_step / max(1, stage.steps - 1)
    return float((1 - frac) * stage.max_tilt_start + frac * stage.max_tilt_end)


def views_at(stage: StageConfig, seed: int, step: int) -> int:
    """Views per sample at global ``step``: uniform in ``[views_min, views_max]``, the same on every rank."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, 0x5EE]))
    return int(rng.integers(stage.views_min, stage.views_max + 1))
