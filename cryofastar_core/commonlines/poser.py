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
from cryofastar_core.commonlines.detect import CommonLines, detect_common_lines, line_features
from cryofastar_core.commonlines.detect import shift_ramps as line_shift_ramps
from cryofastar_core.commonlines.learned import LineEncoder
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


@dataclass
class PreparedViews:
    """Views centred on their centroids and masked to the particle: ``masked`` ``(N, D, D)``, the
    ``mask`` ``(D, D)`` used, and the centring ``shifts`` ``(N, 2)`` px (origin convention)."""

    masked: Tensor
    mask: Tensor
    shifts: Tensor


def prepare_views(images: Tensor, cfg: CommonLinesConfig) -> PreparedViews:
    """Preprocessed views ``(N, D, D)`` (``D = cfg.box``) centred and masked as the estimator uses them."""
    if images.ndim != 3 or images.shape[-1] != cfg.box or images.shape[-2] != cfg.box:
        raise ValueError(f"images must be (N, {cfg.box}, {cfg.box}), got {tuple(images.shape)}")
    centred, shifts = centre_images(images)
    radius = (cfg.mask_radius * cfg.box / 2) if cfg.mask_radius is not None else fit_mask_radius(centred)
    mask = soft_mask(cfg.box, radius, device=images.device)
    return PreparedViews(masked=centred * mask, mask=mask, shifts=shifts)


def encode_lines(masked: Tensor, mask: Tensor, cfg: CommonLinesConfig, encoder: LineEncoder | None = None,
                 n_lines: int | None = None) -> Tensor:
    """Unit line features ``(N, L, K)`` complex of masked views ``(N, D, D)``: whitened lines
    (:func:`~.detect.line_features`), through the learned ``encoder`` when one is given (its image
    correction is masked again). ``n_lines``: ``L``, the configuration's by default."""
    if encoder is not None:
        masked = encoder.denoise(masked) * mask
    features = line_features(fourier_lines(masked, n_lines or cfg.n_lines, cfg.radii), cfg.whiten)
    return encoder.embed(features) if encoder is not None else features


def shift_ramps(cfg: CommonLinesConfig, device=None) -> Tensor:
    """``(S, K)`` the phase ramps of the configuration's relative-shift search."""
    return line_shift_ramps(cfg.radii, cfg.shifts, cfg.box, device=device)


def candidate_common_lines(prepared: PreparedViews, cfg: CommonLinesConfig,
                           encoder: LineEncoder | None = None) -> list[CommonLines]:
    """Every pair's common line, classical; with a learned ``encoder`` also its proposals placed by the
    classical scores within ``cfg.proposal_window_deg`` (or, with no window, as the encoder found them)."""
    ramps = shift_ramps(cfg, prepared.masked.device)
    classical = encode_lines(prepared.masked, prepared.mask, cfg)
    found = [detect_common_lines(classical, ramps)]
    if encoder is None:
        return found
    proposed = detect_common_lines(encode_lines(prepared.masked, prepared.mask, cfg, encoder), ramps)
    if cfg.proposal_window_deg is None:
        return found + [proposed]
    window = int(round(cfg.proposal_window_deg * cfg.n_lines / 360))
    return found + [detect_common_lines(classical, ramps, prior=proposed.angles, window=window)]


def most_consistent(candidates: list[CommonLines], sigma_deg: float) -> tuple[CommonLines, Tensor, Tensor]:
    """The candidate set of common lines whose triangles agree most (the highest mean vote share,
    :func:`~.sync.vote_dihedral_angles`), with its ``cos θ`` and vote weights. The votes are the
    estimator's own check: proposals of a learned encoder that the geometry does not bear out (on
    clean images, where the classical lines are right) lose to the classical set."""
    voted = [(c, *vote_dihedral_angles(c.angles, sigma_deg)) for c in candidates]
    return max(voted, key=lambda v: float(v[2].mean()))


def estimate_rotations(images: Tensor, cfg: CommonLinesConfig, encoder: LineEncoder | None = None) -> RotationEstimate:
    """Rotations of ``N`` views ``(N, D, D)`` (preprocessed, ``D = cfg.box``) from their common lines,
    scored through a learned ``encoder`` when one is given (:mod:`~.learned`)."""
    n = images.shape[0]
    if n < 3:
        raise ValueError(f"common lines need at least 3 views, got {n}")
    prepared = prepare_views(images, cfg)
    found, cos_theta, weight = most_consistent(candidate_common_lines(prepared, cfg, encoder), cfg.vote_sigma_deg)
    start = synchronize(relative_blocks(found.angles, cos_theta), weight)
    rotations = refine_rotations(start, found.angles, weight, cfg.refine_iterations)
    support = weight.sum(1) / max(n - 1, 1)
    return RotationEstimate(rotations=rotations, support=support, shifts=prepared.shifts)


class CommonLinesPoser(nn.Module):
    """Common lines behind the pose-model interface: classical (no parameters, nothing learned), or
    scored through a trained :class:`~.learned.LineEncoder`."""

    def __init__(self, cfg: CommonLinesConfig | None = None, encoder: LineEncoder | None = None):
        super().__init__()
        self.cfg = cfg or CommonLinesConfig()
        self.encoder = encoder.eval() if encoder is not None else None
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def forward(self, images: Tensor) -> ModelOutput:
        """``images`` ``(B, V, D, D)`` preprocessed; view 0 is the reference."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, V, D, D), got {tuple(images.shape)}")
        grid = polar_grid(*_GRID, device=images.device)
        xyz, conf = [], []
        for sample in images:
            est = estimate_rotations(sample, self.cfg, self.encoder)
            rot = est.rotations.to(torch.float64)
            xyz.append(fpm_targets(rot[None, 0], rot[None], est.shifts[None].double(), self.cfg.box, grid)[0])
            share = est.support.clamp(0, 0.999).to(torch.float64)
            conf.append((1.0 / (1.0 - share))[:, None, None].expand(-1, *_GRID))
        return ModelOutput(xyz=torch.stack(xyz).float(), conf=torch.stack(conf).float(), denoised=None, grid=grid)
