"""The line model: each view's 1D projections as its tokens, and a polar FPM.

Why lines: line ``θ`` of a view is the molecule's 1D marginal
along the 3D direction ``R u_θ`` (:mod:`cryofastar_core.physics.line_transform`), so attention between the
lines of two views is common-line matching, and an in-plane rotation of a view by one line step is a
cyclic shift of its tokens. Patch tokens must learn that geometry from data; on our compute they
did not (docs/model-history.md).

Data flow, for ``B`` samples of ``V`` views (view 0 the reference):

    images (B, V, D, D) --line transform--> lines (B, V, L, S) --embed--> tokens (B, V, L, d)
    --encoder (within a view, periodic RoPE)--> --decoder (View Integration / View Update, as
    :mod:`cryofastar_core.model.patch.decoder`; across views position-free, biased by line similarity)-->
    --heads--> per line: direction d_l (3), offset o_l (3), K confidence logits
    polar FPM X(l, k) = r_k d_l + o_l at the in-plane points ū(l, k) = r_k u_l

The similarity bias (:func:`~cryofastar_core.model.lines.decoder.line_similarity`,
:class:`~cryofastar_core.model.lines.decoder.MatchBias`) hands the decoder's cross-view attention the
common-line scores the physics gives for free: without it, or with all views attending to all (no
reference bottleneck), a small model did not learn (docs/model-history.md, "Design measurements").

The parts: :mod:`~cryofastar_core.model.lines.encoder`, :mod:`~cryofastar_core.model.lines.decoder`,
:mod:`~cryofastar_core.model.lines.head`; this module joins them.

The target of line ``l`` of view ``i`` is ``R_0ᵀ R_i u_l`` plus the shift encoding ``h(t_i)``
(:mod:`cryofastar_core.model.fpm`), so the same Kabsch, loss and hand handling apply as for the
dense FPM. Only the reference knows absolute angles (its lines get an angle embedding and its head
the base ``u_l``): the auxiliary branch sees no absolute angle anywhere, so its output for a rotated
view is the same set of directions, shifted along with the tokens, and Kabsch composes the pose
with the rotation exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.physics.line_transform import line_transform

from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.fpm import normalize
from cryofastar_core.model.lines.decoder import LineDecoder, line_similarity
from cryofastar_core.model.lines.encoder import LineEncoder
from cryofastar_core.model.lines.head import LineHead, polar_grid
from cryofastar_core.model.output import MAX_CONF_LOGIT, ModelOutput


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
