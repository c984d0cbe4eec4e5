"""What every model variant returns (:class:`ModelOutput`), read by the loss, Kabsch and inference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_CONF_LOGIT = 20.0  # C = 1 + exp(logit) stays finite in fp32 and its log well conditioned


@dataclass
class ModelOutput:
    """``xyz`` ``(B, V, P1, P2, 3)`` normalised FPM ``X̃`` at the in-plane points ``grid``
    ``(P1, P2, 3)`` (the dense ``D × D`` planar grid of a patch model, the polar ``L × K`` grid of a
    line model; ``None`` means the planar grid); ``conf`` ``(B, V, P1, P2)`` = 1 + exp(logit) ≥ 1;
    ``denoised`` ``(B, V, D, D)`` or ``None`` without a denoise head. View 0 is the reference."""

    xyz: torch.Tensor
    conf: torch.Tensor
    denoised: torch.Tensor | None
    grid: torch.Tensor | None = None
