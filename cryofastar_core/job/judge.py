"""The data-only verdict on a set of posed particles, as the job judges every map it writes (class 1, each
further class) and every class it refines: :func:`assess_quality`."""
from __future__ import annotations

import logging

import numpy as np
import torch

from cryofastar_core.evaluation.verdict import PoseQuality, assess_poses
from cryofastar_core.io import ParticleSet
from cryofastar_core.job.work_scale import AB_INITIO_BOX, cropped_loader
from cryofastar_core.physics.fourier import fourier_crop_volume

log = logging.getLogger(__name__)

# The verdict's thresholds were calibrated on box-64 particles (bench/results/2026-12-05-quality-calibration.md).
JUDGING_BOX = AB_INITIO_BOX


def assess_quality(particles: ParticleSet, idx: np.ndarray, rotations: np.ndarray, shifts: np.ndarray,
                   half: np.ndarray, half_maps: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   ) -> PoseQuality:
    """The data-only pose-quality verdict (:mod:`cryofastar_core.evaluation.verdict`) of the particles ``idx``
    (indices into ``particles``) at their poses ``rotations`` ``(n, 3, 3)``, ``shifts`` ``(n, 2)`` (input px)
    in half sets ``half`` ``(n,)``, against ``half_maps``; judged at the box it was calibrated at
    (``JUDGING_BOX``, or the input box when smaller): images and half maps Fourier-cropped, shifts and pixel
    size scaled (at box 256 the full-box verdict took longer than the reconstruction,
    ``bench/results/2026-12-06-scale.md``)."""
    box = min(particles.box, JUDGING_BOX)
    to_box = box / particles.box
    log.info("judging the poses of up to %d particles against the half maps (box %d)", min(len(idx), 2000), box)
    load = cropped_loader(particles, idx, box, torch.device("cpu"))
    ctf = particles.ctf_params(idx) if particles.ctf is not None else None
    maps = tuple(fourier_crop_volume(m, box) if box < particles.box else m for m in half_maps)
    return assess_poses(load, ctf, float(particles.apix[0]) / to_box, np.asarray(rotations),
                        np.asarray(shifts) * to_box, np.asarray(half), maps, device=device)
