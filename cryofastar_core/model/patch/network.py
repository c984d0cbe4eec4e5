"""CryoFastAR: images of one particle set -> FPMs of every view in the reference view's frame."""
from __future__ import annotations

import torch
from torch import nn

from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.fpm import normalize, planar_grid
from cryofastar_core.model.output import MAX_CONF_LOGIT, ModelOutput
from cryofastar_core.model.patch.decoder import Decoder
from cryofastar_core.model.patch.encoder import Encoder
from cryofastar_core.model.patch.head import FPMHead


class CryoFastAR(nn.Module):
    """The patch-token model: shared ViT encoder, reference/auxiliary decoder, one dense head
    per branch. Kept as the baseline of the A/B in docs/model-history.md; the shipped model is
    :class:`~cryofastar_core.model.lines.network.LineCryoFastAR`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.ref_head = FPMHead(cfg.dec_dim, cfg.neck_dim, cfg.patch, cfg.denoise_head)
        self.aux_head = FPMHead(cfg.dec_dim, cfg.neck_dim, cfg.patch, cfg.denoise_head)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith((".out", ".denoise")):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.encoder.patch_embed, nn.Conv2d):
            # The patch embedding initialised like a linear layer over the flattened patch.
            w = self.encoder.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.encoder.patch_embed.bias)
        nn.init.trunc_normal_(self.decoder.ref_embedding, std=0.02)
        nn.init.trunc_normal_(self.decoder.aux_embedding, std=0.02)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        """``images`` ``(B, V, D, D)`` real-space, preprocessed; view 0 is the reference."""
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-2:] != (cfg.box, cfg.box) or images.shape[1] < 1:
            raise ValueError(f"images must be (B, V, {cfg.box}, {cfg.box}), got {tuple(images.shape)}")
        b, v, d, _ = images.shape
        tokens = self.encoder(images.reshape(b * v, d, d))
        ref, aux = self.decoder(tokens.reshape(b, v, cfg.tokens, cfg.enc_dim))
        # Heads in fp32: the FPM needs more precision than bf16's 8 bits to resolve sub-degree poses.
        with torch.autocast(device_type=images.device.type, enabled=False):
            ref_out, ref_den = self.ref_head(ref.float(), cfg.grid)
            outs, dens = [ref_out[:, None]], [ref_den[:, None]] if ref_den is not None else None
            if v > 1:
                aux_out, aux_den = self.aux_head(aux.float().reshape(b * (v - 1), cfg.tokens, -1), cfg.grid)
                outs.append(aux_out.reshape(b, v - 1, d, d, 4))
                if dens is not None:
                    dens.append(aux_den.reshape(b, v - 1, d, d))
            out = torch.cat(outs, dim=1)
            xyz = out[..., :3]
            if cfg.xyz_grid_base:
                xyz = xyz + normalize(planar_grid(d, device=out.device, dtype=out.dtype))
            conf = 1.0 + torch.exp(out[..., 3].clamp(max=MAX_CONF_LOGIT))
            denoised = torch.cat(dens, dim=1) if dens is not None else None
        return ModelOutput(xyz=xyz, conf=conf, denoised=denoised,
                           grid=planar_grid(d, device=out.device, dtype=out.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
