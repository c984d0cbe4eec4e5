"""Reference/auxiliary decoder, with two learned view embeddings (one per branch, so any number of views
uses only trained embeddings).

Each layer runs View Integration on the reference (self-attention, cross-attention to all auxiliary
tokens, MLP) and then View Update on the auxiliary views (self-attention per view, cross-attention
to the *updated* reference, MLP). Auxiliary views only talk to each other through the reference, so
the cost is linear in the number of views, and the auxiliary branch is permutation-equivariant:
every auxiliary view gets the same embedding and the same weights.
"""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.model.blocks import AuxiliaryBlock, ReferenceBlock, run_block
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.rope import RoPE2D


class Decoder(nn.Module):
    """``dec_depth`` pairs of View Integration (:class:`ReferenceBlock`) and View Update
    (:class:`AuxiliaryBlock`) layers with 2D RoPE, then one LayerNorm per branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        # One embedding for "this is the reference", one shared by every auxiliary view, so any
        # number of views is in distribution (unlike a per-index table).
        self.ref_embedding = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.aux_embedding = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.ref_blocks = nn.ModuleList(ReferenceBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.dec_depth))
        self.aux_blocks = nn.ModuleList(AuxiliaryBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.dec_depth))
        self.ref_norm = nn.LayerNorm(cfg.dec_dim)
        self.aux_norm = nn.LayerNorm(cfg.dec_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``(B, V, T, enc_dim)`` -> reference ``(B, T, dec_dim)``, auxiliary ``(B, V−1, T, dec_dim)``."""
        b, v, t, _ = tokens.shape
        x = self.embed(tokens)
        ref = x[:, 0] + self.ref_embedding
        aux = x[:, 1:] + self.aux_embedding
        rope = RoPE2D(self.cfg.dec_dim // self.cfg.dec_heads, self.cfg.grid, self.cfg.grid,
                      self.cfg.rope_base, device=x.device)
        rope_aux = rope.tile(v - 1) if v > 1 else None
        use_ckpt = self.cfg.checkpointing and self.training
        for ref_block, aux_block in zip(self.ref_blocks, self.aux_blocks):
            context = aux.reshape(b, (v - 1) * t, -1) if v > 1 else None
            ref = run_block(ref_block, use_ckpt, ref, context, rope, rope_aux)
            if v > 1:
                aux = run_block(aux_block, use_ckpt, aux, ref, rope, rope_aux)
        return self.ref_norm(ref), self.aux_norm(aux)
