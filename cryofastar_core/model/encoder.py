"""Shared ViT encoder on real-space particle images (1 channel, T = (D/p)² tokens, 2D RoPE)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import EncoderBlock
from .config import ModelConfig
from .rope import RoPE2D


def sincos_position_embedding(grid: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine embedding ``(grid², dim)`` of each patch's position relative to the image
    centre (row-major): half the channels encode the row, half the column, at geometric frequencies."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4 for a 2D sine-cosine embedding")
    centre = (grid - 1) / 2
    coords = torch.arange(grid, device=device, dtype=torch.float64) - centre
    freqs = 1.0 / (grid ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4)))
    angles = coords[:, None] * freqs  # (grid, dim/4)
    per_axis = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (grid, dim/2)
    rows = per_axis[:, None, :].expand(grid, grid, -1)
    cols = per_axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def conv_stem(in_channels: int, dim: int, patch: int) -> nn.Sequential:
    """Stride-2 3×3 convolutions (GELU between) from the image down to the patch grid, then a 1×1 to
    ``dim``: ``log2(patch)`` stages, channels doubling from ``dim / 2^(stages-1)``.

    A convolutional stem instead of one p×p linear patch embedding ("early convolutions help
    transformers see better", Xiao et al. 2021): local edge and orientation features come for free,
    which in our probes let a relative in-plane angle be learned at all within CPU budgets (model card).
    """
    stages = patch.bit_length() - 1
    if patch < 2 or 1 << stages != patch:
        raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch}")
    layers: list[nn.Module] = []
    width = max(16, dim >> (stages - 1))
    c_in = in_channels
    for i in range(stages):
        c_out = min(dim, width << i)
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, dim, kernel_size=1))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Patch embedding (p×p conv, stride p) [+ absolute position] → ``enc_depth`` pre-LN blocks → LayerNorm.

    RoPE gives every attention layer relative positions, but attention outputs are sums of values,
    which carry no position: with RoPE alone a token cannot report *where* its match in another view
    lies. ``abs_pos`` adds a fixed sine-cosine embedding of the patch position (relative to the image
    centre, where the particle sits) to the patch tokens, so positions travel with the features.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        channels = 2 if cfg.ref_channel else 1
        if cfg.stem == "conv":
            self.patch_embed = conv_stem(channels, cfg.enc_dim, cfg.patch)
        else:
            self.patch_embed = nn.Conv2d(channels, cfg.enc_dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``(N, D, D)`` or ``(N, C, D, D)`` -> tokens ``(N, T, enc_dim)`` (row-major over the patch grid)."""
        x = self.patch_embed(images[:, None] if images.ndim == 3 else images).flatten(2).transpose(1, 2)
        if self.cfg.abs_pos:
            x = x + sincos_position_embedding(self.cfg.grid, self.cfg.enc_dim, device=x.device).to(x.dtype)
        rope = RoPE2D(self.cfg.enc_dim // self.cfg.enc_heads, self.cfg.grid, self.cfg.grid,
                      self.cfg.rope_base, device=x.device)
        for block in self.blocks:
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)
