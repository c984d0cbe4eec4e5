"""The line model's encoder: each view's lines as tokens (:func:`line_features`), attention within a
view with periodic RoPE (a one-line in-plane rotation of the view is a cyclic shift of its tokens)."""
from __future__ import annotations

import math

import torch
from torch import nn

from cryofastar_core.model.blocks import EncoderBlock, run_block
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.rope import PeriodicRoPE1D


def line_features(lines: torch.Tensor) -> torch.Tensor:
    """Per-line features ``(..., L, S + S // 2 + 1)``: the profile scaled by its view's RMS, and its
    amplitude spectrum (unchanged by a shift along the line, which an image shift causes)."""
    s = lines.shape[-1]
    scale = lines.float().pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-6)
    x = lines.float() / scale
    spectrum = torch.fft.rfft(x, dim=-1).abs() / math.sqrt(s)
    return torch.cat([x, spectrum], dim=-1)


class LineEncoder(nn.Module):
    """Line features -> MLP embedding -> ``enc_depth`` pre-LN blocks within each view -> LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_feat = cfg.line_samples + cfg.line_samples // 2 + 1
        self.embed = nn.Sequential(nn.Linear(n_feat, cfg.enc_dim), nn.GELU(), nn.Linear(cfg.enc_dim, cfg.enc_dim))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, lines: torch.Tensor) -> torch.Tensor:
        """``lines`` ``(N, L, S)`` -> tokens ``(N, L, enc_dim)``."""
        x = self.embed(line_features(lines))
        rope = PeriodicRoPE1D(self.cfg.enc_dim // self.cfg.enc_heads, self.cfg.n_lines, device=x.device)
        for block in self.blocks:
            x = run_block(block, self.cfg.checkpointing and self.training, x, rope)
        return self.norm(x)
