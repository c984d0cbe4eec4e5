"""The line model's head and its polar FPM grid: per line token a direction, an offset and ``K``
confidence logits, giving FPM points ``X(l, k) = r_k d_l + o_l`` at ``ū(l, k) = r_k u_l``
(:func:`polar_grid`)."""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.physics.line_transform import line_directions

from cryofastar_core.model.blocks import Mlp


def polar_grid(n_lines: int, n_radii: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The polar FPM's in-plane points ``ū(l, k) = r_k u_l`` ``(L, K, 3)``, ``r_k = (k + 1) / K``."""
    radii = torch.arange(1, n_radii + 1, device=device, dtype=dtype) / n_radii
    return radii[None, :, None] * line_directions(n_lines, device=device, dtype=dtype)[:, None, :]


class LineHead(nn.Module):
    """Per line token: direction ``d`` (3), offset ``o`` (3) and ``K`` confidence logits.

    The final linear starts at zero, so the reference head (base ``u_l``) first outputs the exact
    reference FPM and the auxiliary head the mean target (all points at the origin).
    """

    def __init__(self, dim: int, n_radii: int):
        super().__init__()
        self.mlp = Mlp(dim, 1.0)
        self.out = nn.Linear(dim, 6 + n_radii)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, radii: torch.Tensor, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` ``(..., L, d)`` -> un-normalised points ``(..., L, K, 3)`` and logits ``(..., L, K)``."""
        p = self.out(tokens + self.mlp(tokens))
        direction, offset = p[..., :3], p[..., 3:6]
        if base is not None:
            direction = direction + base
        xyz = radii[:, None] * direction[..., None, :] + offset[..., None, :]
        return xyz, p[..., 6:]
