"""Junk found from the data alone: particles with no evidence for any pose are set apart from the maps.

Every global pass already scores each particle at every orientation of a grid against its own half map
(:mod:`cryofastar_core.refine.global_pass`). A particle's **evidence** is its best score on that grid (the
CTF-aware, noise-whitened matched filter); not the score at its current pose, where its own image is in
the map and lifts it above anything the null below can reach. An image of pure noise or of ice has nothing to match: its best score is the extreme of chance.
So the logarithm of the evidence is bimodal in a set with junk, and unimodal in a clean one.

The threshold comes from the data, in two parts:

* **A two-component split.** A two-Gaussian mixture is fitted to ``log(evidence)`` (EM) and a particle is
  flagged when the low component explains it better (posterior above 1/2). The split is taken only when
  the mixture beats a single Gaussian by ``min_bic_gain`` in BIC: a clean set's scores are not perfectly
  Gaussian, and without this the mixture would cut it in two.
* **A null from the same pass.** Every ``null_every``-th particle is also scored with its Fourier phases
  randomised (same amplitudes, so the same power and CTF envelope; no structure) on the same grid, with
  the same maximisation: that is what a structureless image of this data set scores. The split is taken
  only when the low component sits below the null's median, i.e. it really is the junk's mode and not a
  weaker subpopulation of good particles.

Measured (``bench/results/2026-12-06-junk.md``): pure-noise junk is caught completely with almost no good
particle lost, and a clean set loses none; **projections of another protein are not caught**: at the
global passes' coarse band their best scores overlap the good particles'.

The flagged particles still get poses (they are matched like the rest, so a later pass may clear them),
but from the next pass on they are not inserted into the maps, unless ``exclude_junk`` is off.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class JunkRule:
    """What one decision was based on (``report.json`` and the refinement history).

    ``split``: whether a junk mode was found; ``n_flagged``; the mixture's components on ``log(evidence)``
    (``mean_low``, ``sd_low``, ``mean_high``, ``sd_high``, ``weight_low``), ``bic_gain`` of two components
    over one, and ``null_median``, the median ``log(evidence)`` of the phase-randomised copies."""

    split: bool
    n_flagged: int
    mean_low: float
    sd_low: float
    mean_high: float
    sd_high: float
    weight_low: float
    bic_gain: float
    null_median: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def randomised_phases(X: Tensor, generator: torch.Generator) -> Tensor:
    """``X`` ``(n, P)`` complex band samples with their amplitudes kept and their phases drawn uniformly:
    the transform of an image with the same power spectrum and no structure. The band holds half of the
    Fourier plane (Friedel's other half is implied), so the samples' phases are independent."""
    theta = torch.rand(X.shape, generator=generator, dtype=torch.float64) * (2 * math.pi)
    phase = torch.polar(torch.ones_like(theta), theta).to(X.device, X.dtype)
    return X.abs() * phase


def _normal_logpdf(x: Tensor, mean: float, sd: float) -> Tensor:
    return -0.5 * ((x - mean) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def _weighted_logpdf(x: Tensor, w: Tensor, mean: Tensor, sd: Tensor) -> Tensor:
    """``log(w_k N(x; mean_k, sd_k))`` for both components: ``(N, 2)``."""
    return torch.stack([w[k].log() + _normal_logpdf(x, float(mean[k]), float(sd[k])) for k in (0, 1)], -1)


def _two_gaussians(x: Tensor, iterations: int = 200) -> tuple[Tensor, Tensor, Tensor, float]:
    """EM for a two-component 1D Gaussian mixture on ``x`` ``(N,)`` float64, started at the quartiles:
    ``(weights (2,), means (2,), sds (2,), log-likelihood)``, component 0 the lower mean."""
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype))
    mean = torch.stack([q1, q3])
    sd = x.std().clamp_min(1e-6).repeat(2)
    w = torch.tensor([0.5, 0.5], dtype=x.dtype)
    floor = 1e-3 * float(x.std().clamp_min(1e-6))
    for _ in range(iterations):
        log_p = _weighted_logpdf(x, w, mean, sd)
        resp = (log_p - log_p.logsumexp(-1, keepdim=True)).exp()                      # (N, 2)
        nk = resp.sum(0).clamp_min(1e-9)
        w = nk / x.numel()
        mean = (resp * x[:, None]).sum(0) / nk
        sd = ((resp * (x[:, None] - mean) ** 2).sum(0) / nk).sqrt().clamp_min(floor)
    log_p = _weighted_logpdf(x, w, mean, sd)
    order = torch.argsort(mean)
    return w[order], mean[order], sd[order], float(log_p.logsumexp(-1).sum())


def flag_junk(evidence: Tensor, null_evidence: Tensor, min_bic_gain: float = 10.0) -> tuple[Tensor, Tensor, JunkRule]:
    """Which particles are junk, from their ``evidence`` ``(N,)`` (positive matched-filter scores) and the
    ``null_evidence`` ``(M,)`` of phase-randomised copies (module docstring).

    Returns ``(junk (N,) bool, z (N,) float64, rule)``: ``z`` is each particle's ``log(evidence)`` in
    standard deviations of the good (high) component (of the whole set when no split is taken): the
    per-particle score written out (``rlnParticleSelectZScore``), low for junk."""
    x = evidence.double().clamp_min(1e-12).log()
    null_median = float(null_evidence.double().clamp_min(1e-12).log().median()) if null_evidence.numel() else math.nan
    n = x.numel()
    one_ll = float(_normal_logpdf(x, float(x.mean()), float(x.std().clamp_min(1e-6))).sum())
    w, mean, sd, two_ll = _two_gaussians(x)
    # BIC = k ln N - 2 ln L; a 1D two-Gaussian mixture has 5 parameters, one Gaussian 2.
    bic_gain = (2 * math.log(n) - 2 * one_ll) - (5 * math.log(n) - 2 * two_ll)
    split = bool(bic_gain > min_bic_gain and math.isfinite(null_median) and float(mean[0]) < null_median)
    if split:
        log_p = _weighted_logpdf(x, w, mean, sd)
        junk = (log_p[:, 0] > log_p[:, 1]) & (x < mean[1])
        z = (x - mean[1]) / sd[1]
    else:
        junk = torch.zeros(n, dtype=torch.bool)
        z = (x - x.mean()) / x.std().clamp_min(1e-6)
    rule = JunkRule(split=split, n_flagged=int(junk.sum()), mean_low=float(mean[0]), sd_low=float(sd[0]),
                    mean_high=float(mean[1]), sd_high=float(sd[1]), weight_low=float(w[0]), bic_gain=float(bic_gain),
                    null_median=null_median)
    return junk, z, rule
