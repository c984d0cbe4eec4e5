"""What a pose set is worth, judged from the data alone: a verdict for every run.

A high half-map FSC does not mean the poses are right: when every particle gets the same wrong kind
of pose, both halves agree with each other. So the verdict rests on figures that a random or a
collapsed pose set cannot fake, each computed on at most ``max_particles`` particles:

* **Significance against random poses.** Each particle of half set ``h`` is scored against the map
  of the *other* half (independent of the particle itself), by refinement's CTF-aware matched filter
  (:func:`cryofastar_core.refine.matching.candidate_scores`), at its own pose and at ``random_poses``
  Haar-random ones (same shift). ``significance`` is the fraction of particles whose own pose beats
  every random one, rescaled so that chance is 0 and every particle beating every random pose is 1.
  Random poses give a map whose projections all look alike: significance near 0.
* **Local sharpness.** The same particle scored at ``near_poses`` poses ``near_deg`` away from its
  own (random axes). For poses much better than ``near_deg``, the own pose beats its neighbours;
  for poses tens of degrees off, the map (built from those poses) is blurred and the true pose lies
  among the neighbours. ``sharpness`` is the mean fraction of neighbours beaten, rescaled so that a
  coin toss is 0 and beating all is 1. This is what separates "good enough for local refinement"
  from "roughly right".
* **Coverage** of viewing directions: the normalised entropy of the directions over
  ``coverage_bins`` near-equal-area cells (1: uniform; 0: every particle at one direction). A
  collapsed pose set scores well on significance (every image resembles the mean image) but not here.
* The half-map FSC at 0.143 is reported as a consistency figure only, never as evidence.
* **Orientation sampling** of every particle's pose, the sampling compensation factor
  (:mod:`cryofastar_core.evaluation.orientation`): a preferred orientation gives a correct but
  anisotropic map, so it is said in the reasons and ``orientation`` without changing the verdict.

Thresholds come from the calibration of ``bench/quality_calibration.py`` (``bench/results/2026-12-05-quality-calibration.md``):
simulated sets of known accuracy (ground truth, ground truth rotated by 5-60 degrees, random,
collapsed, the shipped weights' poses). ``ok`` means usable as the start of a local refinement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.evaluation.heterogeneity import HETEROGENEOUS_ABOVE, SplitTest
from cryofastar_core.evaluation.orientation import OrientationReport, orientation_report, shell_directions
from cryofastar_core.geometry import random_rotations, rotations_at_angle
from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.fourier import fft2c, fourier_crop_volume
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.reconstruct import fsc, resolution_at, soft_sphere_mask
from cryofastar_core.refine.matching import FourierBand, PowerSpectrum, candidate_scores

VERDICTS = ("ok", "doubtful", "failed")


@dataclass
class QualityConfig:
    """Settings of :func:`assess_poses`; the thresholds are calibrated (module docstring)."""

    max_particles: int = 2000
    random_poses: int = 16
    near_poses: int = 16
    near_deg: float = 20.0
    match_resolution_px: float = 4.0  # shells up to box / 4: where low-SNR particles still carry signal
    coverage_bins: int = 100
    seed: int = 0
    batch_points: int = 1 << 20
    # Verdict thresholds (bench/results/2026-12-05-quality-calibration.md).
    fail_significance: float = 0.10
    fail_sharpness: float = 0.15
    fail_coverage: float = 0.35
    ok_significance: float = 0.95
    ok_sharpness: float = 0.55
    ok_coverage: float = 0.70


@dataclass
class PoseQuality:
    """The verdict and the figures it was judged from (``report.json`` → ``quality``)."""

    verdict: str
    reasons: list[str]
    significance: float
    sharpness: float
    coverage: float
    half_map_fsc_0143_A: float  # consistency only: both halves can agree on wrong poses
    n_particles_scored: int
    thresholds: dict = field(default_factory=dict)
    orientation: dict = field(default_factory=dict)  # OrientationReport.to_dict() of every judged pose
    heterogeneity: dict = field(default_factory=dict)  # SplitTest.to_dict() (evaluation/heterogeneity.py), one class

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @property
    def headline(self) -> str:
        """One line for the end of a log: the verdict and its main reason."""
        return f"POSE QUALITY: {self.verdict.upper()}: {self.reasons[0]}"


def viewing_coverage(rotations: Tensor | np.ndarray, bins: int = 100) -> float:
    """Normalised entropy (0-1) of the viewing directions ``R @ z`` of ``rotations`` ``(N, 3, 3)`` over
    ``bins`` near-equal-area cells (a Fibonacci lattice, nearest centre). Uniform directions give
    about 1 once ``N`` is much larger than ``bins``; one direction gives 0."""
    R = torch.as_tensor(np.asarray(rotations), dtype=torch.float64).reshape(-1, 3, 3)
    d = R[:, :, 2]
    cell = (d @ shell_directions(bins).T).argmax(-1)
    p = torch.bincount(cell, minlength=bins).double() / max(1, d.shape[0])
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(bins))


def assess_poses(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float,
                 rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray, half_set: np.ndarray,
                 half_maps: tuple[Tensor, Tensor], cfg: QualityConfig | None = None,
                 device: torch.device | str = "cpu") -> PoseQuality:
    """Judge ``N`` poses against the half maps made from them; see the module docstring.

    ``load_images(idx)``: real images ``(n, D, D)`` (contrast sign applied) for indices into ``0..N-1``;
    ``ctf``: per-particle parameters in the same order or ``None``; ``rotations`` ``(N, 3, 3)`` (internal
    convention), ``shifts`` ``(N, 2)`` px, ``half_set`` ``(N,)`` in {1, 2}; ``half_maps``: the two
    ``(D, D, D)`` reconstructions from these poses.
    """
    cfg = cfg or QualityConfig()
    dev = torch.device(device)
    R_all = torch.as_tensor(np.asarray(rotations), dtype=torch.float64)
    s_all = torch.as_tensor(np.asarray(shifts), dtype=torch.float64)
    half = np.asarray(half_set)
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = _sample_particles(R_all.shape[0], cfg.max_particles, gen)
    maps, res_0143 = _masked_half_maps(half_maps, apix, dev)
    band, refs = _match_references(maps, cfg, dev)
    perturb = _trial_rotations(cfg, gen)
    scores = _score_poses(load_images, ctf, apix, R_all, s_all, half, pick, band, refs, perturb, cfg, dev)
    significance, sharpness = _pose_figures(scores, cfg)
    coverage = viewing_coverage(R_all[torch.as_tensor(pick)], cfg.coverage_bins)
    orientation = orientation_report(R_all, int(half_maps[0].shape[-1]))
    return _pose_quality(significance, sharpness, coverage, res_0143, len(pick), orientation, cfg)


def _sample_particles(n: int, max_particles: int, gen: torch.Generator) -> np.ndarray:
    """Sorted indices of at most ``max_particles`` of the ``n`` particles, drawn from ``gen``."""
    return np.sort(torch.randperm(n, generator=gen)[: min(n, max_particles)].numpy())


def judging_mask(box: int, device: torch.device | str | None = None) -> Tensor:
    """The soft spherical mask ``(box, box, box)`` the verdict and the split test judge maps under."""
    return soft_sphere_mask(box, 0.45 * box - 3.0, 3.0, device=device)


def _masked_half_maps(half_maps: tuple[Tensor, Tensor], apix: float,
                      dev: torch.device) -> tuple[list[Tensor], float]:
    """The half maps under the :func:`judging_mask` (on ``dev``, float32) and their FSC 0.143 resolution (Å)."""
    mask = judging_mask(int(half_maps[0].shape[-1]), dev)
    maps = [m.to(dev, torch.float32) * mask for m in half_maps]
    freq, curve = fsc(maps[0], maps[1])
    return maps, resolution_at(freq, curve, apix, 0.143)


def _match_references(maps: list[Tensor], cfg: QualityConfig, dev: torch.device) -> tuple[FourierBand, list[Tensor]]:
    """The Fourier band matched in (up to ``cfg.match_resolution_px``) and each masked half map prepared for
    projection within it."""
    D = int(maps[0].shape[-1])
    band = FourierBand(D, max(2.0, D / cfg.match_resolution_px), dev)
    refs = [prepare_volume(fourier_crop_volume(m, band.crop)) for m in maps]
    return band, refs


def _trial_rotations(cfg: QualityConfig, gen: torch.Generator) -> Tensor:
    """The rotations each particle's own pose is scored under: the identity (its own pose), then
    ``cfg.random_poses`` Haar-random ones, then ``cfg.near_poses`` at ``cfg.near_deg``, drawn from ``gen``."""
    return torch.cat([torch.eye(3, dtype=torch.float64)[None],
                      random_rotations(cfg.random_poses, generator=gen, dtype=torch.float64),
                      rotations_at_angle(cfg.near_poses, cfg.near_deg, gen)])


def _score_poses(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float, R_all: Tensor,
                 s_all: Tensor, half: np.ndarray, pick: np.ndarray, band: FourierBand, refs: list[Tensor],
                 perturb: Tensor, cfg: QualityConfig, dev: torch.device) -> Tensor:
    """Matched-filter scores ``(len(pick), len(perturb))`` of the picked particles at their poses times each
    of ``perturb``, every particle against the map of the other half set, in chunks of 512."""
    E = torch.ones(band.kx.numel(), 1, dtype=torch.complex64, device=dev)  # the particle's own shift only
    spectrum = PowerSpectrum(band.box, dev)
    scores = torch.empty(len(pick), perturb.shape[0], dtype=torch.float64)
    chunk = 512
    for start in range(0, len(pick), chunk):
        sub = pick[start:start + chunk]
        ft = fft2c(load_images(sub).to(dev, torch.float32))
        spectrum.add(ft)
        w = (1.0 / spectrum.mean()[band.shell].clamp_min(1e-30)).to(torch.float32)
        X = ft.reshape(ft.shape[0], -1)[:, band.idx_full]
        for h in (1, 2):
            sel = np.flatnonzero(half[sub] == h)
            if sel.size == 0:
                continue
            gi = torch.as_tensor(sub[sel])
            other = refs[2 - h]  # half 1 is scored against map 2 and vice versa: no self-reference
            sc = candidate_scores(other, band, X[torch.as_tensor(sel, device=dev)], R_all[gi], s_all[gi], perturb, E,
                                  w, None if ctf is None else ctf.index(gi.to(dev)), apix, cfg.batch_points)
            scores[start + sel] = sc[..., 0].double().cpu()
    return scores


def _pose_figures(scores: Tensor, cfg: QualityConfig) -> tuple[float, float]:
    """Significance against the random poses and sharpness against the near ones (module docstring)."""
    own = scores[:, 0]
    rand = scores[:, 1:1 + cfg.random_poses]
    near = scores[:, 1 + cfg.random_poses:]
    chance = 1.0 / (cfg.random_poses + 1)
    beats_all = float((own[:, None] > rand).all(-1).double().mean())
    significance = (beats_all - chance) / (1 - chance)
    sharpness = 2.0 * float((own[:, None] > near).double().mean()) - 1.0
    return significance, sharpness


def _pose_quality(significance: float, sharpness: float, coverage: float, res_0143: float, n_scored: int,
                  orientation: OrientationReport, cfg: QualityConfig) -> PoseQuality:
    """The verdict on the figures, with the figures (rounded), the thresholds it was judged by and the
    orientation diagnostic (a reason of its own when the sampling is anisotropic)."""
    verdict, reasons = _verdict(significance, sharpness, coverage, cfg)
    if orientation.anisotropic:
        reasons = [*reasons, orientation.sentence]
    thresholds = {k: getattr(cfg, k) for k in ("fail_significance", "fail_sharpness", "fail_coverage",
                                                "ok_significance", "ok_sharpness", "ok_coverage")}
    return PoseQuality(verdict=verdict, reasons=reasons, significance=round(significance, 4),
                       sharpness=round(sharpness, 4), coverage=round(coverage, 4), half_map_fsc_0143_A=res_0143,
                       n_particles_scored=n_scored, thresholds=thresholds, orientation=orientation.to_dict())


def _verdict(significance: float, sharpness: float, coverage: float, cfg: QualityConfig) -> tuple[str, list[str]]:
    """``failed`` when any figure is at chance, ``ok`` when every figure clears its bar, else ``doubtful``;
    the reasons come worst first."""
    failed, doubts = [], []
    if significance < cfg.fail_significance:
        failed.append(f"particles match the map no better at their poses than at random poses "
                      f"(significance {significance:.2f}, chance 0, failing below {cfg.fail_significance:.2f})")
    elif significance < cfg.ok_significance:
        doubts.append(f"particles match the map only weakly better at their poses than at random poses "
                      f"(significance {significance:.2f}; ok from {cfg.ok_significance:.2f})")
    if coverage < cfg.fail_coverage:
        failed.append(f"the poses cluster at few viewing directions (coverage {coverage:.2f}; failing below "
                      f"{cfg.fail_coverage:.2f}), as a collapsed estimate does")
    elif coverage < cfg.ok_coverage:
        doubts.append(f"the viewing directions are unevenly covered (coverage {coverage:.2f}; ok from "
                      f"{cfg.ok_coverage:.2f})")
    if sharpness < cfg.fail_sharpness:
        failed.append(f"poses {cfg.near_deg:.0f} deg away match about as well as the particles' own (sharpness "
                      f"{sharpness:.2f}; failing below {cfg.fail_sharpness:.2f}): the poses are far off")
    elif sharpness < cfg.ok_sharpness:
        doubts.append(f"poses {cfg.near_deg:.0f} deg away often match as well (sharpness {sharpness:.2f}; ok from "
                      f"{cfg.ok_sharpness:.2f}): the poses are at best roughly right")
    if failed:
        return "failed", failed + doubts
    if doubts:
        return "doubtful", doubts
    return "ok", [f"particles match their poses far better than random ones (significance {significance:.2f}), "
                  f"better than poses {cfg.near_deg:.0f} deg away (sharpness {sharpness:.2f}), over a spread of "
                  f"viewing directions (coverage {coverage:.2f})"]


# Maps built with more than this fraction of particles that show no evidence for any pose are not "ok": the
# junk is averaged in (issue 24: 10 % junk in the maps put them 31 Å from the truth under an "ok" verdict).
JUNK_IN_MAPS_DOUBTFUL = 0.05


def with_junk(quality: PoseQuality, n_junk: int, n_judged: int, in_maps: bool) -> PoseQuality:
    """``quality`` told about junk (:mod:`cryofastar_core.refine.junk`): ``n_junk`` of ``n_judged`` particles
    show no evidence for any pose. Left out of the maps, they are a reason line; kept in them (``in_maps``)
    above :data:`JUNK_IN_MAPS_DOUBTFUL`, an ``ok`` becomes ``doubtful``."""
    if n_junk == 0:
        return quality
    fraction = n_junk / max(n_judged, 1)
    if not in_maps:
        line = (f"{n_junk} of {n_judged} particles ({fraction:.1%}) showed no evidence for any pose (junk): left out "
                f"of the maps and written to junk.star")
        return replace(quality, reasons=[*quality.reasons, line])
    line = (f"{n_junk} of {n_judged} particles ({fraction:.1%}) show no evidence for any pose (junk) and were kept in "
            f"the maps (--keep-junk)")
    if quality.verdict == "ok" and fraction > JUNK_IN_MAPS_DOUBTFUL:
        return replace(quality, verdict="doubtful", reasons=[line, *quality.reasons])
    return replace(quality, reasons=[*quality.reasons, line])


def with_class_disagreement(quality: PoseQuality, support: float, threshold: float, refined: bool) -> PoseQuality:
    """``quality`` told that the poses came from 2D class averages whose common-lines poses agree only to
    ``support`` (median vote share, 0-1). Particles of one class share one pose, so a map built from wrong
    class poses still fits them better than random poses: the data-only figures cannot see it (on 3HSY at
    SNR 0.1 they read ``ok`` at 141 degrees from the truth, bench/results/2026-12-06-class-averages.md).
    Below ``threshold`` an unrefined ``ok`` becomes ``doubtful``; refined poses keep their verdict, with
    the reason line."""
    if support >= threshold:
        return quality
    line = (f"the class averages' poses agree poorly (median vote support {support:.2f}, below {threshold:.2f}): "
            "the 2D classes probably mix views")
    if quality.verdict == "ok" and not refined:
        return replace(quality, verdict="doubtful", reasons=[line, *quality.reasons])
    return replace(quality, reasons=[*quality.reasons, line])


# The last mate pass (refine/mates.py) changing more than this share of the particles that chose in it: the
# passes ran out before the set settled on one side of its near-symmetry, and the maps blend the two. Where the
# passes resolved a set they ended at 0-0.6 % (3HSY, 6FLR 10,000); 6FLR at 2,000 particles, a blend with a
# third of them at the mate, ended at 5.8 % (bench/results/2026-12-06-class-averages.md, session 20).
MATES_UNRESOLVED_ABOVE = 0.02


def with_unresolved_mates(quality: PoseQuality, refinement: list[dict]) -> PoseQuality:
    """``quality`` told whether refinement's mate passes (its ``refinement`` history) left the particles
    split between their poses and the map's near-symmetric mates. The pose figures cannot see it: both
    sides fit the blended map. Unresolved, an ``ok`` becomes ``doubtful``, with the reason first."""
    chose = [h for h in refinement if h.get("stage") == "mates" and h.get("mode") == "choose"]
    if not chose or chose[-1].get("flipped_fraction", 0.0) <= MATES_UNRESOLVED_ABOVE:
        return quality
    line = (f"the map nearly matches itself turned by a half turn (match {chose[-1]['mate_score']:.2f}) and its "
            f"particles did not settle on one side: the last of {len(chose)} passes still turned "
            f"{chose[-1]['flipped_fraction']:.1%} of those it tested, so the map blends the two; more particles "
            "resolve it (6FLR: 10,000 did, 2,000 did not)")
    if quality.verdict == "ok":
        return replace(quality, verdict="doubtful", reasons=[line, *quality.reasons])
    return replace(quality, reasons=[*quality.reasons, line])


def with_heterogeneity(quality: PoseQuality, test: SplitTest, into_classes: bool = False) -> PoseQuality:
    """``quality`` told whether its particles split reproducibly into two populations
    (:mod:`cryofastar_core.evaluation.heterogeneity`). The pose figures cannot see it: a consensus fits
    the conformation most particles share and the others' poses still beat random ones (a 50:50 mixture
    of two conformations read ``ok`` at 73 degrees off, bench/results/2026-12-06-classes.md). A
    heterogeneous set's ``ok`` becomes ``doubtful``, with the reason first (after a failure's); unless the run
    went on as two classes (``into_classes``): ``quality`` is then class 1's own, and a line says why the
    run has classes."""
    quality = replace(quality, heterogeneity=test.to_dict())
    if not test.heterogeneous:
        return quality
    found = (f"the particles split into two groups whose maps differ beyond their noise in both half sets "
             f"(split figure {test.figure:.4f}; one population stays below {HETEROGENEOUS_ABOVE}): a mixture of "
             f"conformations or of proteins")
    if into_classes:
        return replace(quality, reasons=[*quality.reasons, f"{found}; refined as two classes, this is class 1"])
    line = f"{found}; run with --classes 2 (or without --no-split-mixed) or classify in the host"
    if quality.verdict == "failed":  # the failure stays the headline
        return replace(quality, reasons=[*quality.reasons, line])
    return replace(quality, verdict="doubtful", reasons=[line, *quality.reasons])
