"""Shared ViT encoder on real-space particle images (1 channel, T = (D/p)² tokens, 2D RoPE)."""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.model.blocks import EncoderBlock, run_block
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.rope import RoPE2D


class Encoder(nn.Module):
    """Patch embedding (p×p conv, stride p) → ``enc_depth`` pre-LN blocks with 2D RoPE → LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(1, cfg.enc_dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``(N, D, D)`` -> tokens ``(N, T, enc_dim)`` (row-major over the patch grid)."""
        x = self.patch_embed(images[:, None]).flatten(2).transpose(1, 2)
        rope = RoPE2D(self.cfg.enc_dim // self.cfg.enc_heads, self.cfg.grid, self.cfg.grid,
                      self.cfg.rope_base, device=x.device)
        for block in self.blocks:
            x = run_block(block, self.cfg.checkpointing and self.training, x, rope)
        return self.norm(x)
