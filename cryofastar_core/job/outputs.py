"""The files a run writes: particles (STAR, and .cs for CryoSPARC input), maps, FSC, plots; staged and
moved into place together. Also the guard that no output overwrites an input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryofastar_core.evaluation.verdict import PoseQuality
from cryofastar_core.io import CONFIDENCE_LABEL, ParticleSet, write_map, write_particles_cs, write_particles_star
from cryofastar_core.io.atomic_write import staged_output_dir
from cryofastar_core.reconstruct import fsc_tsv
from cryofastar_core.runtime.errors import InputError


def write_outputs(out: Path, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                   keep: np.ndarray, confidence: np.ndarray, est: dict, full: torch.Tensor, half1: torch.Tensor,
                   half2: torch.Tensor, freq: torch.Tensor, curve: torch.Tensor, apix: float,
                   quality: PoseQuality) -> list[str]:
    from cryofastar_core.evaluation.plots import confidence_histogram, fsc_plot, viewing_direction_plot

    with staged_output_dir(out) as stage:
        # The per-particle confidence (0-1) under a label RELION 3.1 knows, so RELION programs keep it.
        write_particles_star(particles, stage / "particles.star", rotations=rotations, shifts=shifts, half_set=half,
                             extra_columns={CONFIDENCE_LABEL: confidence}, keep=keep)
        if particles.source_format == "cryosparc":
            write_particles_cs(particles, stage / "particles.cs", rotations, shifts, half_set=half, keep=keep)
        write_map(stage / "map.mrc", full.cpu().numpy(), apix)
        write_map(stage / "half1.mrc", half1.cpu().numpy(), apix)
        write_map(stage / "half2.mrc", half2.cpu().numpy(), apix)
        verdict = f"pose quality: {quality.verdict}"
        if quality.verdict == "failed":
            # The crossings would read as a resolution: the halves agree only on wrong poses.
            fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", mark_crossings=False,
                     title=f"half-map FSC: consistency only, NOT a resolution ({verdict})")
        else:
            fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", title=f"half-map FSC ({verdict})")
        viewing_direction_plot(rotations[keep], stage / "viewing_directions.png",
                               title=f"viewing directions (N = {int(keep.sum())}; SCF {quality.orientation.get('scf', float('nan')):.2f}; "
                                     f"{verdict})")
        confidence_histogram(confidence, stage / "confidence.png",
                             threshold=float(confidence[keep].min()) if not keep.all() else None)
        (stage / "fsc.tsv").write_text(fsc_tsv(freq, curve, apix))
        names = sorted(p.name for p in stage.iterdir())
    return names


def refuse_overwriting_inputs(particles: ParticleSet, out: Path) -> None:
    inputs = {Path(particles.source).resolve(), *(Path(p).resolve() for p in particles.image_files)}
    for name in ("particles.star", "particles.cs", "map.mrc", "half1.mrc", "half2.mrc"):
        target = (out / name).resolve()
        if target in inputs:
            raise InputError(particles.source, None, f"the output {target} would overwrite an input file",
                             "choose an output folder (--o) that holds none of the inputs")

