"""2D rotary position embedding (RoPE) on an image patch grid.

Each attention head's channels are split in two halves: the first half rotates with the token's
patch row, the second with its patch column. Within a half of ``m`` channels, channel ``k`` and
``k + m/2`` form a rotation pair with angle ``pos · base^(−2k/m)``. Attention scores then depend only
on the row and column *differences* between tokens, so no absolute position embedding is needed.
"""
from __future__ import annotations

import torch


class RoPE2D:
    """Cosine/sine tables for one patch grid, applied to ``(B, H, N, head_dim)`` queries or keys.

    Tokens are numbered row-major over a ``rows × cols`` grid; a sequence holding several views of
    the same grid (``N = n_views · rows · cols``) reuses each view's positions (:meth:`tile`).
    """

    def __init__(self, head_dim: int, rows: int, cols: int, base: float, device=None,
                 dtype: torch.dtype = torch.float32):
        if head_dim % 4:
            raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for 2D RoPE")
        half = head_dim // 2
        inv_freq = base ** (-torch.arange(0, half, 2, device=device, dtype=torch.float64) / half)  # (half/2,)
        r, c = torch.meshgrid(torch.arange(rows, device=device, dtype=torch.float64),
                              torch.arange(cols, device=device, dtype=torch.float64), indexing="ij")
        pos = torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)  # (T, 2): (row, col)
        angles = pos[:, :, None] * inv_freq  # (T, 2, half/2)
        self.cos = torch.cos(angles).to(dtype)  # (T, axis, half/2)
        self.sin = torch.sin(angles).to(dtype)

    def tile(self, n_views: int) -> "RoPE2D":
        """Tables for a sequence of ``n_views`` consecutive copies of the grid."""
        out = RoPE2D.__new__(RoPE2D)
        out.cos = self.cos.repeat(n_views, 1, 1)
        out.sin = self.sin.repeat(n_views, 1, 1)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``(B, H, N, head_dim)``; ``N`` must match the table length."""
        shape = x.shape
        if shape[-2] != self.cos.shape[0]:
            raise ValueError(f"RoPE table has {self.cos.shape[0]} positions, sequence has {shape[-2]}")
        # (..., N, axis, pair member, frequency)
        x = x.reshape(*shape[:-1], 2, 2, shape[-1] // 4)
        first, second = x.unbind(-2)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        rotated = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-2)
        return rotated.reshape(shape)


class PeriodicRoPE1D:
    """1D RoPE over ``n`` positions on a circle (the line angles ``θ_l = 2π l / n`` of one view).

    Pair ``k`` of a head rotates by ``m_k θ`` with integer frequencies ``m_k`` (cycling through
    ``1 .. n // 2``), so attention scores depend on the angle difference modulo 2π exactly: a cyclic
    shift of a view's tokens (an in-plane rotation by one line step) leaves every score unchanged.
    Same interface as :class:`RoPE2D`.
    """

    def __init__(self, head_dim: int, n: int, device=None, dtype: torch.dtype = torch.float32):
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} must be even for RoPE")
        pairs = head_dim // 2
        freqs = torch.arange(pairs, device=device, dtype=torch.float64) % max(1, n // 2) + 1  # (pairs,)
        theta = torch.arange(n, device=device, dtype=torch.float64) * (2 * torch.pi / n)
        angles = theta[:, None] * freqs  # (n, pairs)
        self.cos = torch.cos(angles).to(dtype)
        self.sin = torch.sin(angles).to(dtype)

    def tile(self, n_views: int) -> "PeriodicRoPE1D":
        out = PeriodicRoPE1D.__new__(PeriodicRoPE1D)
        out.cos = self.cos.repeat(n_views, 1)
        out.sin = self.sin.repeat(n_views, 1)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-2] != self.cos.shape[0]:
            raise ValueError(f"RoPE table has {self.cos.shape[0]} positions, sequence has {shape[-2]}")
        x = x.reshape(*shape[:-1], 2, shape[-1] // 2)
        first, second = x.unbind(-2)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-2).reshape(shape)


class NoRoPE:
    """Position-free attention (the identity), for attention between tokens of different views."""

    def tile(self, n_views: int) -> "NoRoPE":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x
