"""The line model's decoder: View Integration on the reference, View Update on each auxiliary view (as
:mod:`cryofastar_core.model.patch.decoder`), with position-free cross-view attention biased by line
similarity (:func:`line_similarity`, :class:`MatchBias`): the common-line scores the physics gives
for free. Only the reference's tokens carry their absolute angle (:func:`angle_features`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cryofastar_core.model.blocks import AuxiliaryBlock, ReferenceBlock, run_block
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.rope import PeriodicRoPE1D


def line_similarity(lines: torch.Tensor, max_lag: int = 0) -> torch.Tensor:
    """Cosine similarities ``(B, 2, L, V·L)`` between the reference's lines and every line of the
    sample, from ``lines`` ``(B, V, L, S)`` (view 0 the reference): channel 0 on the band-passed
    profiles (a smoothed copy removed, so the overall blob shape every line shares does not
    dominate), channel 1 on the amplitude spectra without the constant term (unchanged by a shift
    along the line).

    Common lines have similarity 1 in channel 0 (equal marginals); they are what cross-view attention
    has to find, so these scores enter the attention as a learned bias (:class:`MatchBias`) instead of
    being rediscovered from data. Only reference-to-view pairs are needed (auxiliary views meet only
    through the reference), so the cost is linear in the number of views.

    ``max_lag`` > 0: channel 0 is the best similarity over cyclic lags of up to that many samples,
    so common lines still match when their views are shifted (an image shift ``t`` moves line θ by
    ``t · u_θ``); with shifted images it learned better than zero lag (docs/model-history.md, "Design measurements").
    """
    b, v, n, s = lines.shape
    x = lines.float().reshape(b * v * n, 1, s)
    k = s // 4 + 1 - (s // 4) % 2  # odd
    smooth = F.avg_pool1d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    band = (x - smooth).reshape(b, v * n, s)
    spec = torch.fft.rfft(x.reshape(b, v * n, s), dim=-1).abs()[..., 1:]
    band, spec = (_unit(f - f.mean(-1, keepdim=True)) for f in (band, spec))
    sim_band = None
    for lag in range(-max_lag, max_lag + 1):
        c = torch.roll(band[:, :n], lag, dims=-1) @ band.transpose(-1, -2)
        sim_band = c if sim_band is None else torch.maximum(sim_band, c)
    return torch.stack([sim_band, spec[:, :n] @ spec.transpose(-1, -2)], dim=1)


def _unit(feat: torch.Tensor) -> torch.Tensor:
    return feat / feat.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def zscore_rows(sim: torch.Tensor) -> torch.Tensor:
    """Standardise similarities over the keys (last dim): a match stands out by how far it sits
    above the other candidates, whatever the structure's overall line-to-line similarity."""
    mean = sim.mean(-1, keepdim=True)
    return (sim - mean) / sim.std(-1, keepdim=True).clamp_min(1e-6)


class MatchBias(nn.Module):
    """Per-head weights of the two similarity channels: ``bias_h = Σ_c w_hc · z(sim_c)``."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, 0.0]] * heads))

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        """``sim`` ``(B, 2, Nq, Nk)`` standardised -> bias ``(B, H, Nq, Nk)``."""
        return torch.einsum("hc,bcqk->bhqk", self.weight.to(sim.dtype), sim)


def angle_features(n_lines: int, device=None) -> torch.Tensor:
    """``(L, L)``: ``cos(m θ_l), sin(m θ_l)`` for ``m = 1 .. L/2``: the reference's absolute angles."""
    theta = torch.arange(n_lines, device=device, dtype=torch.float64) * (2 * math.pi / n_lines)
    m = torch.arange(1, n_lines // 2 + 1, device=device, dtype=torch.float64)
    return torch.cat([torch.cos(theta[:, None] * m), torch.sin(theta[:, None] * m)], dim=-1).float()


class LineDecoder(nn.Module):
    """The reference/auxiliary decoder on lines: View Integration on the reference, View Update on each
    auxiliary view; auxiliary views talk to each other only through the reference. Cross-view attention is
    position-free (only line content can say which lines are common) and biased by line similarity;
    the reference's tokens alone carry their absolute angle (its lines define the frame)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        self.ref_embedding = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.aux_embedding = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.ref_angle = nn.Linear(cfg.n_lines, cfg.dec_dim)
        self.ref_blocks = nn.ModuleList(ReferenceBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cross_positions=False)
                                        for _ in range(cfg.dec_depth))
        self.aux_blocks = nn.ModuleList(AuxiliaryBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cross_positions=False)
                                        for _ in range(cfg.dec_depth))
        self.ref_bias = nn.ModuleList(MatchBias(cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.aux_bias = nn.ModuleList(MatchBias(cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim)

    def forward(self, tokens: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, V, L, enc_dim)``, ``sim`` ``(B, 2, L, V·L)`` (:func:`line_similarity`)
        -> ``(B, V, L, dec_dim)``."""
        b, v, t, _ = tokens.shape
        x = self.embed(tokens)
        ref = x[:, 0] + self.ref_embedding + self.ref_angle(angle_features(t, device=x.device))
        aux = x[:, 1:] + self.aux_embedding
        rope = PeriodicRoPE1D(self.cfg.dec_dim // self.cfg.dec_heads, t, device=x.device)
        rope_aux = rope.tile(v - 1) if v > 1 else None
        sim_ref = zscore_rows(sim[:, :, :t, t:]) if v > 1 else None  # reference queries, auxiliary keys
        sim_aux = zscore_rows(sim[:, :, :t, t:].transpose(-1, -2)) if v > 1 else None
        use_ckpt = self.cfg.checkpointing and self.training
        for i, (ref_block, aux_block) in enumerate(zip(self.ref_blocks, self.aux_blocks)):
            context = aux.reshape(b, (v - 1) * t, -1) if v > 1 else None
            bias = self.ref_bias[i](sim_ref) if v > 1 else None
            ref = run_block(ref_block, use_ckpt, ref, context, rope, rope_aux, bias)
            if v > 1:
                aux = run_block(aux_block, use_ckpt, aux, ref, rope, rope_aux, self.aux_bias[i](sim_aux))
        return self.norm(torch.cat([ref[:, None], aux], dim=1))
