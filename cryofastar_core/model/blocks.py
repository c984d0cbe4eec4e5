"""Transformer building blocks: attention with 2D RoPE, MLP, encoder and decoder blocks, and
:func:`run_block`, the one place that decides whether a block runs under activation checkpointing.

All blocks are pre-LayerNorm with residual connections. Attention uses
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available). Both model
variants (:mod:`cryofastar_core.model.patch`, :mod:`cryofastar_core.model.lines`) build on these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cryofastar_core.model.rope import NoRoPE, RoPE2D


class Mlp(nn.Module):
    """Linear → GELU → linear."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, H, N, hd)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on queries and keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RoPE2D, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias`` ``(B, H, N, N)``: optional additive attention scores."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head cross-attention; queries and keys each carry their own tokens' patch positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope_q: RoPE2D, rope_k: RoPE2D,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias`` ``(B, H, N_q, N_k)``: optional additive attention scores."""
        q = _split_heads(self.q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(rope_q(q), rope_k(k), v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(_merge_heads(out))


class EncoderBlock(nn.Module):
    """ViT block: x + SA(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, rope: RoPE2D) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class _DecoderBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to a normalised context, MLP (the layers both decoder
    branches share; each branch's ``forward`` decides who attends to whom).

    ``cross_positions=False`` makes the cross-attention position-free: for line tokens the angle
    between a line of one view and a line of another means nothing (each view has its own in-plane
    rotation), so only the content may decide which lines match.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_positions: bool = True):
        super().__init__()
        self.cross_positions = cross_positions
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)


class ReferenceBlock(_DecoderBlock):
    """View Integration: reference tokens attend to themselves, then to all auxiliary tokens.

    ``ref`` ``(B, T, d)``; ``aux`` ``(B, (V−1)·T, d)`` (the auxiliary views concatenated), or ``None``
    when there is no auxiliary view (the cross-attention is then skipped).
    """

    def forward(self, ref: torch.Tensor, aux: torch.Tensor | None, rope: RoPE2D,
                rope_aux: RoPE2D | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        ref = ref + self.attn(self.norm1(ref), rope)
        if aux is not None:
            rq, rk = (rope, rope_aux) if self.cross_positions else (_NO_ROPE, _NO_ROPE)
            ref = ref + self.cross(self.norm2(ref), self.norm_context(aux), rq, rk, bias)
        return ref + self.mlp(self.norm3(ref))


class AuxiliaryBlock(_DecoderBlock):
    """View Update: each auxiliary view attends to itself, then to the updated reference tokens.

    ``aux`` ``(B, V−1, T, d)``; self-attention runs batched over ``B·(V−1)`` views. The
    cross-attention runs as one ``(B, (V−1)·T)`` query sequence against the ``T`` reference keys,
    which is the same as per-view cross-attention without repeating the reference ``V−1`` times.
    """

    def forward(self, aux: torch.Tensor, ref: torch.Tensor, rope: RoPE2D, rope_aux: RoPE2D,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, t, d = aux.shape
        x = aux.reshape(b * n, t, d)
        x = x + self.attn(self.norm1(x), rope)
        x = x.reshape(b, n * t, d)
        rq, rk = (rope_aux, rope) if self.cross_positions else (_NO_ROPE, _NO_ROPE)
        x = x + self.cross(self.norm2(x), self.norm_context(ref), rq, rk, bias)
        x = x + self.mlp(self.norm3(x))
        return x.reshape(b, n, t, d)


_NO_ROPE = NoRoPE()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(N, C, H, W)`` feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def run_block(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``, under activation checkpointing when ``checkpointing`` is on and gradients
    are being recorded (pass ``cfg.checkpointing and module.training``). Checkpointing saves memory
    only: non-reentrant :func:`torch.utils.checkpoint.checkpoint` recomputes the same values in the
    backward pass (RNG state preserved), so outputs and gradients do not change."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
