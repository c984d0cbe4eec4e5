"""Training loss on normalised FPMs, invariant to the hand.

    L = mean[ C ⊙ (X̃_pred − X̃_gt)² ]                  confidence-weighted squared error per coordinate
      − α · mean[ log C ]                              keeps C from growing without bound
      + grid_weight · mean| Δ X̃_pred − Δ X̃_gt |        L1 on neighbour differences along x and y
      + denoise_weight · mean[ (denoised − clean)² ]    auxiliary denoising head

Hand invariance: the mirror solution (z -> −z of every auxiliary FPM) explains the images equally
well, so per sample the regression term is computed against both hands and the smaller one is kept;
the grid term uses the same chosen hand. The means run over views, pixels and coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cryofastar_core.model.fpm import mirror_fpm
from cryofastar_core.model.output import ModelOutput


@dataclass
class LossConfig:
    """``alpha``: weight of −mean log C; ``grid_weight`` / ``denoise_weight``: 0 disables the term;
    ``hand_invariant``: min over the two hands per sample; ``include_reference``: whether view 0
    enters the FPM terms (the denoise term always uses every view)."""

    alpha: float = 0.1
    grid_weight: float = 0.0  # 10 stalled learning (docs/model-history.md, tests/test_model_learns.py); 0 disables
    denoise_weight: float = 1.0
    hand_invariant: bool = True
    include_reference: bool = True


def fpm_loss(out: ModelOutput, target_xyz: torch.Tensor, clean_images: torch.Tensor | None,
             cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss and detached per-term values.

    ``target_xyz`` ``(B, V, D, D, 3)`` normalised FPMs, ``clean_images`` ``(B, V, D, D)`` (needed when the
    denoise term is on). The dict holds ``loss``, ``regression``, ``log_conf``, ``grid``, ``denoise``
    (each a scalar; disabled terms are 0) and ``hand_flipped`` ``(B,)`` bool: True where the mirrored
    target was chosen.
    """
    if out.xyz.shape != target_xyz.shape:
        raise ValueError(f"prediction {tuple(out.xyz.shape)} and target {tuple(target_xyz.shape)} differ")
    first = 0 if cfg.include_reference else 1
    if out.xyz.shape[1] <= first:
        raise ValueError("no view left for the FPM loss: include_reference=False needs V >= 2")
    pred = out.xyz[:, first:]
    conf = out.conf[:, first:]
    target = target_xyz.to(pred.dtype)

    def regression(tgt: torch.Tensor) -> torch.Tensor:  # per sample (B,)
        return (conf[..., None] * (pred - tgt[:, first:]) ** 2).flatten(1).mean(1)

    reg = regression(target)
    flipped = torch.zeros(pred.shape[0], dtype=torch.bool, device=pred.device)
    chosen = target
    if cfg.hand_invariant:
        mirrored = mirror_fpm(target)
        reg_m = regression(mirrored)
        flipped = reg_m < reg
        reg = torch.where(flipped, reg_m, reg)
        chosen = torch.where(flipped[:, None, None, None, None], mirrored, target)
    regression_term = reg.mean()
    log_conf = torch.log(conf).mean()
    total = regression_term - cfg.alpha * log_conf

    zero = pred.new_zeros(())
    grid_term = zero
    if cfg.grid_weight:
        grid_term = _grid_l1(pred, chosen[:, first:])
        total = total + cfg.grid_weight * grid_term

    denoise_term = zero
    if cfg.denoise_weight:
        if out.denoised is None or clean_images is None:
            raise ValueError("denoise_weight > 0 needs a model with a denoise head and clean_images; "
                             "set LossConfig.denoise_weight = 0 otherwise")
        denoise_term = ((out.denoised - clean_images.to(out.denoised.dtype)) ** 2).mean()
        total = total + cfg.denoise_weight * denoise_term

    terms = dict(loss=total, regression=regression_term, log_conf=log_conf, grid=grid_term,
                 denoise=denoise_term)
    terms = {k: v.detach() for k, v in terms.items()}
    terms["hand_flipped"] = flipped
    return total, terms


def _grid_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between neighbour differences along x (columns) and y (rows) of ``(B, V, D, D, 3)`` maps."""
    dx = (pred.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
    dy = (pred.diff(dim=-3) - target.diff(dim=-3)).abs().mean()
    return dx + dy
