"""Dense FPM heads of the patch model: decoder tokens -> per-pixel xyz, confidence logit and
(optionally) a denoised image. A per-token linear writes every pixel of its p×p block independently
(an affine per-token map was measured and removed: docs/model-history.md)."""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.model.blocks import LayerNorm2d


class FPMHead(nn.Module):
    """Neck (1×1 conv, LN2d, 3×3 conv, LN2d) then a per-token linear unpacked into a p×p pixel block.

    Output per pixel: 3 FPM coordinates and a confidence logit; with ``denoise`` also a denoised
    real-space image from a second linear. The final linears start at zero, so the head's first
    output is exactly its base (see :class:`~cryofastar_core.model.patch.network.CryoFastAR`).
    """

    def __init__(self, dim: int, neck: int, patch: int, denoise: bool):
        super().__init__()
        self.patch = patch
        self.neck = nn.Sequential(
            nn.Conv2d(dim, neck, kernel_size=1, bias=False), LayerNorm2d(neck),
            nn.Conv2d(neck, neck, kernel_size=3, padding=1, bias=False), LayerNorm2d(neck),
        )
        self.out = nn.Linear(neck, 4 * patch * patch)
        self.denoise = nn.Linear(neck, patch * patch) if denoise else None
        for layer in (self.out, self.denoise):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` ``(N, T, d)``, ``T = grid²`` -> ``(N, D, D, 4)`` and denoised ``(N, D, D)`` or None."""
        n, t, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(n, d, grid, grid)
        x = self.neck(x).permute(0, 2, 3, 1)  # (N, g, g, neck)
        out = self._unpatchify(self.out(x), 4)
        den = self._unpatchify(self.denoise(x), 1)[..., 0] if self.denoise is not None else None
        return out, den

    def _unpatchify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """``(N, g, g, p·p·C)`` -> ``(N, g·p, g·p, C)``: token (i, j) fills pixels [i·p:(i+1)·p, j·p:(j+1)·p]."""
        n, g, _, _ = x.shape
        p = self.patch
        x = x.reshape(n, g, g, p, p, channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, g * p, g * p, channels)
