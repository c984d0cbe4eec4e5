"""The common-lines estimator as a pose model with the network's interface.

:class:`CommonLinesPoser` takes the same preprocessed views ``(B, V, D, D)`` as the line network
(view 0 the reference) and returns a :class:`~cryofastar_core.model.output.ModelOutput` whose FPMs
are exact planes at the rotations it found, ``R_0ᵀ R_i`` applied to the in-plane points: Kabsch
recovers them exactly, so the estimator's chunks, anchors and hand check run unchanged
(:mod:`cryofastar_core.inference.estimator`). Its confidence is each view's share of agreeing
votes (:func:`~.sync.vote_dihedral_angles`), ``C = 1 / (1 − share)`` so that the job's
``confidence_score`` ``1 − 1/C`` reads the share itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryofastar_core.commonlines.config import CommonLinesConfig
from cryofastar_core.commonlines.detect import detect_common_lines
from cryofastar_core.commonlines.polar import centre_images, fit_mask_radius, fourier_lines, soft_mask
from cryofastar_core.commonlines.sync import refine_rotations, relative_blocks, synchronize, vote_dihedral_angles
from cryofastar_core.model.fpm import fpm_targets
from cryofastar_core.model.lines.head import polar_grid
from cryofastar_core.model.output import ModelOutput

_GRID = (8, 4)  # in-plane points of the exact FPMs handed to Kabsch (any non-collinear set is exact)


@dataclass
class RotationEstimate:
    """``rotations`` ``(N, 3, 3)`` image -> map frame, up to one global rotation and hand;
    ``support`` ``(N,)`` each view's mean vote share over its pairs; ``shifts`` ``(N, 2)`` px, the
    centring shifts (origin convention)."""

    rotations: Tensor
    support: Tensor
    shifts: Tensor


def estimate_rotations(images: Tensor, cfg: CommonLinesConfig) -> RotationEstimate:
    """Rotations of ``N`` views ``(N, D, D)`` (preprocessed, ``D = cfg.box``) from their common lines."""
    if images.ndim != 3 or images.shape[-1] != cfg.box or images.shape[-2] != cfg.box:
        raise ValueError(f"images must be (N, {cfg.box}, {cfg.box}), got {tuple(images.shape)}")
    n = images.shape[0]
    if n < 3:
        raise ValueError(f"common lines need at least 3 views, got {n}")
    centred, shifts = centre_images(images)
    radius = (cfg.mask_radius * cfg.box / 2) if cfg.mask_radius is not None else fit_mask_radius(centred)
    masked = centred * soft_mask(cfg.box, radius, device=images.device)
    lines = fourier_lines(masked, cfg.n_lines, cfg.radii)
    found = detect_common_lines(lines, cfg.radii, cfg.box, cfg.shifts, cfg.whiten)
    cos_theta, weight = vote_dihedral_angles(found.angles, cfg.vote_sigma_deg)
    start = synchronize(relative_blocks(found.angles, cos_theta), weight)
    rotations = refine_rotations(start, found.angles, weight, cfg.refine_iterations)
    support = weight.sum(1) / max(n - 1, 1)
    return RotationEstimate(rotations=rotations, support=support, shifts=shifts)


class CommonLinesPoser(nn.Module):
    """Classical common lines behind the pose-model interface (no parameters, nothing learned)."""

    def __init__(self, cfg: CommonLinesConfig | None = None):
        super().__init__()
        self.cfg = cfg or CommonLinesConfig()
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def forward(self, images: Tensor) -> ModelOutput:
        """``images`` ``(B, V, D, D)`` preprocessed; view 0 is the reference."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, V, D, D), got {tuple(images.shape)}")
        grid = polar_grid(*_GRID, device=images.device)
        xyz, conf = [], []
        for sample in images:
            est = estimate_rotations(sample, self.cfg)
            rot = est.rotations.to(torch.float64)
            xyz.append(fpm_targets(rot[None, 0], rot[None], est.shifts[None].double(), self.cfg.box, grid)[0])
            share = est.support.clamp(0, 0.999).to(torch.float64)
            conf.append((1.0 / (1.0 - share))[:, None, None].expand(-1, *_GRID))
        return ModelOutput(xyz=torch.stack(xyz).float(), conf=torch.stack(conf).float(), denoised=None, grid=grid)
