"""Dense FPM heads: decoder tokens -> per-pixel xyz, confidence logit and (optionally) a denoised image.

Two forms of the xyz output (``ModelConfig.head``):

* ``"linear"`` (the official form, default): a per-token linear writes every pixel's xyz of its p×p
  block independently. A token must then know where its block sits in the image to write ``Q ū``
  there, and with RoPE as the only position signal that has to be inferred from content.
* ``"affine"`` (an experiment): each token writes a 3×2 matrix ``A`` and an offset ``b`` and its pixels
  get ``A ū + b`` at their absolute frequency coordinates ``ū``. An exact FPM is a single such map
  (``Q``'s first two columns and ``h(t)``), so the token only has to agree with the others on the
  pose; the output stays dense (one map per token, a confidence per pixel), so Kabsch is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import LayerNorm2d
from .fpm import planar_grid


class FPMHead(nn.Module):
    """Neck (1×1 conv, LN2d, 3×3 conv, LN2d) then a per-token linear unpacked into a p×p pixel block.

    Output per pixel: 3 FPM coordinates and a confidence logit; with ``denoise`` also a denoised
    real-space image from a second linear. The final linears start at zero, so the head's first
    output is exactly its base (see :class:`~cryofastar_core.model.network.CryoFastAR`).
    """

    def __init__(self, dim: int, neck: int, patch: int, denoise: bool, affine: bool = False):
        super().__init__()
        self.patch = patch
        self.affine = affine
        self.neck = nn.Sequential(
            nn.Conv2d(dim, neck, kernel_size=1, bias=False), LayerNorm2d(neck),
            nn.Conv2d(neck, neck, kernel_size=3, padding=1, bias=False), LayerNorm2d(neck),
        )
        # affine: 6 entries of A (3×2), 3 of b, then one confidence logit per pixel
        self.out = nn.Linear(neck, 9 + patch * patch if affine else 4 * patch * patch)
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
        out = self._affine(self.out(x)) if self.affine else self._unpatchify(self.out(x), 4)
        den = self._unpatchify(self.denoise(x), 1)[..., 0] if self.denoise is not None else None
        return out, den

    def _affine(self, params: torch.Tensor) -> torch.Tensor:
        """``(N, g, g, 9 + p·p)`` -> ``(N, D, D, 4)``: xyz = A ū + b over each token's block, then the logits."""
        n, g, _, _ = params.shape
        p = self.patch
        uv = planar_grid(g * p, device=params.device, dtype=params.dtype)[..., :2]  # ū's (x, y), (D, D, 2)
        uv = uv.reshape(g, p, g, p, 2).permute(0, 2, 1, 3, 4)  # (g, g, p, p, 2): per token, its block
        mat = params[..., :6].reshape(n, g, g, 3, 2)
        xyz = torch.einsum("nabij,abpqj->nabpqi", mat, uv) + params[..., None, None, 6:9]
        xyz = xyz.permute(0, 1, 3, 2, 4, 5).reshape(n, g * p, g * p, 3)
        conf = self._unpatchify(params[..., 9:], 1)
        return torch.cat([xyz, conf], dim=-1)

    def _unpatchify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """``(N, g, g, p·p·C)`` -> ``(N, g·p, g·p, C)``: token (i, j) fills pixels [i·p:(i+1)·p, j·p:(j+1)·p]."""
        n, g, _, _ = x.shape
        p = self.patch
        x = x.reshape(n, g, g, p, p, channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, g * p, g * p, channels)
