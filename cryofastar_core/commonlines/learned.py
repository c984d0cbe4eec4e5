"""The learned part of common lines: an image encoder and a line metric, trained on which lines are common.

The classical estimator (:mod:`~.detect`) scores two half-lines by the normalised inner product of
their whitened samples. Two places can learn without touching the geometry that follows:

* :class:`LineEncoder` ``.denoise``: a small residual CNN applied to each centred image before its
  lines are sampled (a prior on what a projection of a protein looks like, which a radial filter
  cannot express);
* :class:`LineEncoder` ``.embed``: a complex linear map over the radii of each whitened line
  (``K -> K``; the score becomes ``Re aᴴ W Wᴴ b``: a learned matched filter that can weigh and
  combine radii).

Both start as the identity (the residual CNN's last layer is zero, ``W = I``), so the untrained
encoder *is* the classical baseline, and training can only be judged against it on the same draws
(``bench/model_accuracy.py``). What follows the scores — the best pair per view pair, the votes, the
synchronisation and its refinement — is unchanged and has nothing to train.

The training signal is dense: for every pair of views in a sample, a softmax over all its pairs of
half-lines (and the small relative-shift search, by its maximum) against the true common line
(:func:`true_common_lines`), :func:`common_line_loss`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def true_common_lines(rotations: Tensor) -> Tensor:
    """``(V, V)`` radians: the in-plane angle, in view ``i``, of its common line with view ``j``, for
    rotations ``(V, 3, 3)`` image -> map frame; consistent pairs (``R_i u(a_ij) = R_j u(a_ji)``, the same
    3D direction, as :func:`~.detect.detect_common_lines` returns them). Diagonal 0."""
    r = rotations.double()
    normals = r[:, :, 2]  # (V, 3) each view's plane normal in the map frame
    d = torch.linalg.cross(normals[:, None, :].expand(-1, len(r), -1), normals[None, :, :].expand(len(r), -1, -1))
    d = d / torch.linalg.vector_norm(d, dim=-1, keepdim=True).clamp_min(1e-12)  # (V, V, 3) n_i × n_j
    # one 3D direction per unordered pair: e_ij = n_i × n_j for i < j, and the same e for (j, i)
    lower = torch.ones(len(r), len(r), dtype=torch.bool, device=r.device).tril(-1)
    d = torch.where(lower[..., None], -d, d)
    local = torch.einsum("iab,ija->ijb", r, d)  # R_iᵀ e_ij, in view i's frame
    angles = torch.atan2(local[..., 1], local[..., 0])
    return angles.masked_fill(torch.eye(len(r), dtype=torch.bool, device=r.device), 0.0)


class LineEncoder(nn.Module):
    """Residual CNN on images ``(N, D, D)`` and a complex metric on lines ``(N, L, K)``; identity at start.

    ``n_radii``: ``K``, the radii the estimator samples (:attr:`~.config.CommonLinesConfig.radii`);
    ``channels``/``depth``: the CNN's width and number of 3×3 convolutions (``depth`` 0: no CNN, the
    line metric alone — a CNN is not rotation-equivariant, and its correction costs accuracy on clean
    images: docs/model-history.md, session 12)."""

    def __init__(self, n_radii: int, channels: int = 16, depth: int = 4):
        super().__init__()
        if depth == 1 or depth < 0:
            raise ValueError(f"depth must be 0 (no CNN) or at least 2, got {depth}")
        self.cnn = _residual_cnn(channels, depth) if depth else None
        self.metric_re = nn.Parameter(torch.eye(n_radii))
        self.metric_im = nn.Parameter(torch.zeros(n_radii, n_radii))
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.02)))  # softmax temperature of the loss only
        self.n_radii, self.channels, self.depth = n_radii, channels, depth

    def denoise(self, images: Tensor) -> Tensor:
        """``(N, D, D)`` -> ``(N, D, D)``: the image plus the CNN's correction (the image itself without one)."""
        if self.cnn is None:
            return images
        return images + self.cnn(images[:, None].float())[:, 0]

    def embed(self, features: Tensor) -> Tensor:
        """Whitened lines ``(N, L, K)`` complex -> ``(N, L, K)`` complex, each line of norm 1."""
        metric = torch.complex(self.metric_re, self.metric_im)
        out = features @ metric
        return out / torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min(1e-20)


def _residual_cnn(channels: int, depth: int) -> nn.Sequential:
    """``depth`` 3×3 convolutions ``1 -> channels -> ... -> 1``, the last one zero (an identity correction)."""
    layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GELU()]
    last = nn.Conv2d(channels, 1, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


def pair_scores(features: Tensor, ramps: Tensor) -> Tensor:
    """Scores ``(V, V, L, L/2)`` of every pair of views' half-lines, the maximum over relative shifts.

    ``features`` ``(V, L, K)`` complex unit lines; ``ramps`` ``(S, K)`` complex phase ramps of the searched
    shifts (:func:`~.detect.detect_common_lines`). Entry ``[i, j, a, b]`` compares line ``a`` of ``i`` with
    line ``b < L/2`` of ``j`` moved by each shift."""
    half = features.shape[1] // 2
    mine = torch.cat([features.real, features.imag], -1)  # (V, L, 2K)
    moved = features[:, None, :half, :] * ramps[None, :, None, :]  # (V, S, L/2, K)
    moved = torch.cat([moved.real, moved.imag], -1)
    corr = torch.einsum("ilc,jspc->ijslp", mine, moved)  # (V, V, S, L, L/2)
    return corr.amax(dim=2)


def common_line_targets(angles: Tensor, n_lines: int) -> tuple[Tensor, Tensor]:
    """Indices ``(a, b)`` ``(V, V)`` of the true common line on the score grid of :func:`pair_scores`:
    nearest line of each view, and a pair whose ``b`` falls in the second half turn mapped to the
    conjugate pair ``(a + L/2, b − L/2)``, which scores the same."""
    step = 2 * math.pi / n_lines
    a = torch.round(angles / step).long() % n_lines
    b = torch.round(angles.T / step).long() % n_lines
    half = n_lines // 2
    flip = b >= half
    a = torch.where(flip, (a + half) % n_lines, a)
    b = torch.where(flip, b - half, b)
    return a, b


def common_line_loss(scores: Tensor, angles: Tensor, log_tau: Tensor,
                     tolerance_deg: float = 3.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy of each ordered pair ``i ≠ j``'s softmax over its ``L × L/2`` scores against the true
    common line, and the fraction of pairs whose best score is within ``tolerance_deg`` of it in both
    views (a detection accuracy). ``scores`` ``(V, V, L, L/2)``, ``angles`` ``(V, V)`` true angles."""
    v, _, n_lines, half = scores.shape
    a, b = common_line_targets(angles, n_lines)
    off = ~torch.eye(v, dtype=torch.bool, device=scores.device)
    logits = scores[off].reshape(-1, n_lines * half) / log_tau.exp()
    target = (a * half + b)[off]
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        best = logits.argmax(1)
        da = (best // half - target // half).abs()
        db = (best % half - target % half).abs()
        da = torch.minimum(da, n_lines - da)
        tol = max(1, round(tolerance_deg * n_lines / 360))
        hit = ((da <= tol) & (db <= tol)).float().mean()
    return loss, hit
