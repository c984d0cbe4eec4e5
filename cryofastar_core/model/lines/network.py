"""The line model: each view's 1D projections as its tokens, and a polar FPM.

Why lines: line ``θ`` of a view is the molecule's 1D marginal
along the 3D direction ``R u_θ`` (:mod:`cryofastar_core.physics.line_transform`), so attention between the
lines of two views is common-line matching, and an in-plane rotation of a view by one line step is a
cyclic shift of its tokens. Patch tokens must learn that geometry from data; on our compute they
did not (model card).

Data flow, for ``B`` samples of ``V`` views (view 0 the reference):

    images (B, V, D, D) --line transform--> lines (B, V, L, S) --embed--> tokens (B, V, L, d)
    --encoder (within a view, periodic RoPE)--> --decoder (View Integration / View Update, as
    :mod:`cryofastar_core.model.decoder`; across views position-free, biased by line similarity)-->
    --heads--> per line: direction d_l (3), offset o_l (3), K confidence logits
    polar FPM X(l, k) = r_k d_l + o_l at the in-plane points ū(l, k) = r_k u_l

The similarity bias (:func:`line_similarity`, :class:`MatchBias`) hands the decoder's cross-view
attention the common-line scores the physics gives for free. Measured on one structure with fresh
Haar poses (model card): with it a small model fell from 120° to 28° in 800 steps; without it, or
with all views attending to all (no reference bottleneck), it stayed at 104–122°.

The target of line ``l`` of view ``i`` is ``R_0ᵀ R_i u_l`` plus the shift encoding ``h(t_i)``
(:mod:`cryofastar_core.model.fpm`), so the same Kabsch, loss and hand handling apply as for the
dense FPM. Only the reference knows absolute angles (its lines get an angle embedding and its head
the base ``u_l``): the auxiliary branch sees no absolute angle anywhere, so its output for a rotated
view is the same set of directions, shifted along with the tokens, and Kabsch composes the pose
with the rotation exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cryofastar_core.physics.line_transform import line_directions, line_transform

from cryofastar_core.model.blocks import AuxiliaryBlock, EncoderBlock, Mlp, ReferenceBlock
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.fpm import normalize
from cryofastar_core.model.network import MAX_CONF_LOGIT, ModelOutput
from cryofastar_core.model.rope import PeriodicRoPE1D


def line_features(lines: torch.Tensor) -> torch.Tensor:
    """Per-line features ``(..., L, S + S // 2 + 1)``: the profile scaled by its view's RMS, and its
    amplitude spectrum (unchanged by a shift along the line, which an image shift causes)."""
    s = lines.shape[-1]
    scale = lines.float().pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-6)
    x = lines.float() / scale
    spectrum = torch.fft.rfft(x, dim=-1).abs() / math.sqrt(s)
    return torch.cat([x, spectrum], dim=-1)


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
    ``t · u_θ``). Measured (model card): with shifts it learned 63° where zero lag reached 88°.
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


def polar_grid(n_lines: int, n_radii: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The polar FPM's in-plane points ``ū(l, k) = r_k u_l`` ``(L, K, 3)``, ``r_k = (k + 1) / K``."""
    radii = torch.arange(1, n_radii + 1, device=device, dtype=dtype) / n_radii
    return radii[None, :, None] * line_directions(n_lines, device=device, dtype=dtype)[:, None, :]


def angle_features(n_lines: int, device=None) -> torch.Tensor:
    """``(L, L)``: ``cos(m θ_l), sin(m θ_l)`` for ``m = 1 .. L/2``: the reference's absolute angles."""
    theta = torch.arange(n_lines, device=device, dtype=torch.float64) * (2 * math.pi / n_lines)
    m = torch.arange(1, n_lines // 2 + 1, device=device, dtype=torch.float64)
    return torch.cat([torch.cos(theta[:, None] * m), torch.sin(theta[:, None] * m)], dim=-1).float()


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
            x = _run(block, self.cfg, self.training, x, rope)
        return self.norm(x)


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
        for i, (ref_block, aux_block) in enumerate(zip(self.ref_blocks, self.aux_blocks)):
            context = aux.reshape(b, (v - 1) * t, -1) if v > 1 else None
            bias = self.ref_bias[i](sim_ref) if v > 1 else None
            ref = _run(ref_block, self.cfg, self.training, ref, context, rope, rope_aux, bias)
            if v > 1:
                aux = _run(aux_block, self.cfg, self.training, aux, ref, rope, rope_aux, self.aux_bias[i](sim_aux))
        return self.norm(torch.cat([ref[:, None], aux], dim=1))


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


class LineCryoFastAR(nn.Module):
    """Line encoder shared by all views, the reference/auxiliary decoder with line-matching attention
    bias, one head for the reference and one shared by the auxiliary views."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "lines":
            raise ValueError(f"LineCryoFastAR needs arch 'lines', got {cfg.arch!r}")
        self.cfg = cfg
        self.encoder = LineEncoder(cfg)
        self.decoder = LineDecoder(cfg)
        self.ref_head = LineHead(cfg.dec_dim, cfg.line_radii)
        self.aux_head = LineHead(cfg.dec_dim, cfg.line_radii)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith(".out"):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.decoder.ref_embedding, std=0.02)
        nn.init.trunc_normal_(self.decoder.aux_embedding, std=0.02)

    def lines(self, images: torch.Tensor) -> torch.Tensor:
        """The model's view of ``images`` ``(..., D, D)``: lines ``(..., L, S)``."""
        return line_transform(images, self.cfg.n_lines, self.cfg.line_samples)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        """``images`` ``(B, V, D, D)`` real-space, preprocessed; view 0 is the reference."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-2:] != (cfg.box, cfg.box) or images.shape[1] < 1:
            raise ValueError(f"images must be (B, V, {cfg.box}, {cfg.box}), got {tuple(images.shape)}")
        return self.forward_lines(self.lines(images))

    def forward_lines(self, lines: torch.Tensor) -> ModelOutput:
        """``lines`` ``(B, V, L, S)`` -> polar FPMs ``(B, V, L, K, 3)``."""
        cfg = self.cfg
        b, v, n, s = lines.shape
        if (n, s) != (cfg.n_lines, cfg.line_samples):
            raise ValueError(f"lines must be (B, V, {cfg.n_lines}, {cfg.line_samples}), got {tuple(lines.shape)}")
        tokens = self.encoder(lines.reshape(b * v, n, s)).reshape(b, v, n, cfg.enc_dim)
        x = self.decoder(tokens, line_similarity(lines, max_lag=cfg.similarity_lag))
        with torch.autocast(device_type=lines.device.type, enabled=False):
            x = x.float()
            grid = polar_grid(cfg.n_lines, cfg.line_radii, device=x.device)
            radii = grid[0, :, 0]
            ref_xyz, ref_logit = self.ref_head(x[:, 0], radii, grid[:, -1])
            parts_xyz, parts_logit = [ref_xyz[:, None]], [ref_logit[:, None]]
            if v > 1:
                aux_xyz, aux_logit = self.aux_head(x[:, 1:], radii, None)
                parts_xyz.append(aux_xyz)
                parts_logit.append(aux_logit)
            xyz = normalize(torch.cat(parts_xyz, dim=1))
            conf = 1.0 + torch.exp(torch.cat(parts_logit, dim=1).clamp(max=MAX_CONF_LOGIT))
        return ModelOutput(xyz=xyz, conf=conf, denoised=None, grid=grid)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _run(block: nn.Module, cfg: ModelConfig, training: bool, *args):
    if cfg.checkpointing and training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
