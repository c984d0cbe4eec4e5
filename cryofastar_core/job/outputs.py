"""The files a run writes: particles (STAR, and .cs for CryoSPARC input), maps, FSC, plots; staged and
moved into place together. Also the guard that no output overwrites an input."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofastar_core.evaluation.verdict import PoseQuality
from cryofastar_core.io import CONFIDENCE_LABEL, ParticleSet, write_map, write_particles_cs, write_particles_star
from cryofastar_core.io.atomic_write import staged_output_dir
from cryofastar_core.reconstruct import fsc_tsv
from cryofastar_core.runtime.errors import InputError


# The per-particle junk evidence under a label RELION 3.1 knows (a z-score, as its Select job's): RELION's
# own subset selection can then select on it.
JUNK_SCORE_LABEL = "rlnParticleSelectZScore"
CLASS_LABEL = "rlnClassNumber"
# A class holding less than this share of an even split of the classified particles is a sink (junk, or too
# few particles to be a conformation of its own), as CryoSPARC users read their ab initio classes.
SINK_SHARE = 0.5


@dataclass
class ClassOutput:
    """A class beyond the first: its ``number``, its ``(full, half1, half2, freq, curve, resolution)`` maps and
    its verdict (both ``None`` when it holds fewer than 2 particles)."""

    number: int
    maps: tuple | None
    quality: PoseQuality | None

    @property
    def stem(self) -> str:
        return f"class{self.number:03d}"

    @property
    def files(self) -> list[str]:
        return [] if self.maps is None else [f"{self.stem}_{n}" for n in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.tsv")]


def class_summary(classes: np.ndarray | None, keep: np.ndarray, first: tuple, others: list[ClassOutput]) -> list[dict]:
    """``report.json`` → ``classes`` (empty with one class): per class its number, particles (kept, junk
    aside) and their share, FSC 0.143 resolution (``None`` when its verdict failed), verdict, files, and
    whether it is a sink (``SINK_SHARE``). ``first``: class 1's ``(1, maps, quality)``; its files are the
    run's main ones."""
    if classes is None:
        return []
    total = max(int((keep & (classes > 0)).sum()), 1)
    k = 1 + len(others)
    rows = []
    for number, maps, quality, files in [(*first, ["map.mrc", "half1.mrc", "half2.mrc", "fsc.tsv"])] + \
            [(o.number, o.maps, o.quality, o.files) for o in others]:
        n = int((keep & (classes == number)).sum())
        verdict = None if quality is None else quality.verdict
        rows.append({"number": number, "particles": n, "fraction": round(n / total, 4),
                     "resolution_0143": None if maps is None or verdict == "failed" else round(float(maps[5]), 3),
                     "verdict": verdict, "files": files,
                     "sink": bool(n < SINK_SHARE * total / k or verdict in (None, "failed"))})
    return rows


def write_outputs(out: Path, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                  keep: np.ndarray, confidence: np.ndarray, est: dict, full: torch.Tensor, half1: torch.Tensor,
                  half2: torch.Tensor, freq: torch.Tensor, curve: torch.Tensor, apix: float,
                  quality: PoseQuality, junk: np.ndarray | None = None,
                  junk_score: np.ndarray | None = None, junk_rule: dict | None = None,
                  classes: np.ndarray | None = None, class_outputs: list[ClassOutput] = ()) -> list[str]:
    """Every output of a run, staged and moved into place together; returns the file names written.

    ``keep`` ``(N,)``: the particles in the maps (written to ``particles.star``/``.cs``); ``junk`` ``(N,)``:
    particles set apart as junk (written to ``junk.star``/``.cs`` when any is not in ``keep``);
    ``junk_score`` ``(N,)``: every particle's evidence score, written as ``rlnParticleSelectZScore`` where
    known; ``junk_rule``: the decision's figures (:mod:`cryofastar_core.refine.junk`), for ``junk.png``.
    Several classes: ``classes`` ``(N,)`` (1..K) written as ``rlnClassNumber``; the maps given are class 1's,
    ``class_outputs`` those of classes 2..K, written as ``classNNN_map.mrc``, ``_half1``, ``_half2``, ``_fsc.tsv``."""
    with staged_output_dir(out) as stage:
        # Particles the feed-forward did not pose (outside the ab initio subset) have no confidence: 0 in the
        # STAR column, which RELION programs read as a number.
        columns = {CONFIDENCE_LABEL: np.nan_to_num(confidence, nan=0.0)}
        if junk_score is not None and np.isfinite(junk_score).any():
            columns[JUNK_SCORE_LABEL] = np.nan_to_num(junk_score, nan=0.0)
        if classes is not None:
            columns[CLASS_LABEL] = classes
        _write_particles(stage, "particles", particles, rotations, shifts, half, keep, columns)
        set_apart = None if junk is None else junk & ~keep
        if set_apart is not None and set_apart.any():
            _write_particles(stage, "junk", particles, rotations, shifts, half, set_apart, columns)
        for name, volume in (("map.mrc", full), ("half1.mrc", half1), ("half2.mrc", half2)):
            write_map(stage / name, volume.cpu().numpy(), apix)
        _write_plots(stage, rotations, keep, confidence, freq, curve, apix, quality, set_apart)
        if junk is not None and junk_rule:
            _write_junk_plot(stage, junk, junk_score, junk_rule)
        (stage / "fsc.tsv").write_text(fsc_tsv(freq, curve, apix))
        for c in class_outputs:
            _write_class(stage, c, apix)
        names = sorted(p.name for p in stage.iterdir())
    return names


def _write_class(stage: Path, c: ClassOutput, apix: float) -> None:
    """A further class's maps and FSC, ``classNNN_*``."""
    if c.maps is None:
        return
    full, half1, half2, freq, curve, _ = c.maps
    for name, volume in (("map.mrc", full), ("half1.mrc", half1), ("half2.mrc", half2)):
        write_map(stage / f"{c.stem}_{name}", volume.cpu().numpy(), apix)
    (stage / f"{c.stem}_fsc.tsv").write_text(fsc_tsv(freq, curve, apix))


def _write_particles(stage: Path, stem: str, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray,
                     half: np.ndarray, rows: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """``<stem>.star`` (and ``<stem>.cs`` for CryoSPARC input) of the particles ``rows`` with their poses; the
    per-particle ``columns`` under labels RELION 3.1 knows, so RELION programs keep them."""
    write_particles_star(particles, stage / f"{stem}.star", rotations=rotations, shifts=shifts, half_set=half,
                         extra_columns=columns, keep=rows)
    if particles.source_format == "cryosparc":
        # CryoSPARC numbers 3D classes from 0 in alignments3D/class (the field its class selection reads).
        extra = ({"alignments3D/class": np.clip(columns[CLASS_LABEL] - 1, 0, None).astype(np.uint32)}
                 if CLASS_LABEL in columns else None)
        write_particles_cs(particles, stage / f"{stem}.cs", rotations, shifts, half_set=half, keep=rows, extra=extra)


def _write_plots(stage: Path, rotations: np.ndarray, keep: np.ndarray, confidence: np.ndarray, freq: torch.Tensor,
                 curve: torch.Tensor, apix: float, quality: PoseQuality, set_apart: np.ndarray | None) -> None:
    """``fsc.png`` (no crossings marked when the verdict failed), ``viewing_directions.png``, ``confidence.png``."""
    from cryofastar_core.evaluation.plots import confidence_histogram, fsc_plot, viewing_direction_plot

    verdict = f"pose quality: {quality.verdict}"
    if quality.verdict == "failed":
        # The crossings would read as a resolution: the halves agree only on wrong poses.
        fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", mark_crossings=False,
                 title=f"half-map FSC: consistency only, NOT a resolution ({verdict})")
    else:
        fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", title=f"half-map FSC ({verdict})")
    scf = quality.orientation.get("scf", float("nan"))
    viewing_direction_plot(rotations[keep], stage / "viewing_directions.png",
                           title=f"viewing directions (N = {int(keep.sum())}; SCF {scf:.2f}; {verdict})")
    # The confidence threshold is the selection by confidence: junk set apart later does not move it.
    selected = keep if set_apart is None else keep | set_apart
    confidence_histogram(confidence, stage / "confidence.png",
                         threshold=float(confidence[selected].min()) if not selected.all() else None)


def _write_junk_plot(stage: Path, junk: np.ndarray, junk_score: np.ndarray, rule: dict) -> None:
    """``junk.png``: the refined particles' evidence scores, the junk in red, and where structureless images
    score on the same scale (the null's median, in SDs of the good mode when a split was taken)."""
    from cryofastar_core.evaluation.plots import junk_histogram

    null = rule.get("null_median")
    null_z = ((null - rule["mean_high"]) / rule["sd_high"]) if rule.get("split") and null is not None else None
    refined = np.isfinite(junk_score)
    junk_histogram(junk_score[refined], junk[refined], stage / "junk.png", null_score=null_z,
                   title=f"junk detection: {int(junk.sum())} of {int(refined.sum())} particles without evidence")


def refuse_overwriting_inputs(particles: ParticleSet, out: Path) -> None:
    inputs = {Path(particles.source).resolve(), *(Path(p).resolve() for p in particles.image_files)}
    for name in ("particles.star", "particles.cs", "map.mrc", "half1.mrc", "half2.mrc"):
        target = (out / name).resolve()
        if target in inputs:
            raise InputError(particles.source, None, f"the output {target} would overwrite an input file",
                             "choose an output folder (--o) that holds none of the inputs")

