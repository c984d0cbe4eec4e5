"""At what size refinement works: which particles the ab initio passes see, and at which box.

The job hands its poses to the host's own refinement (RELION, CryoSPARC), so its refinement only needs
poses good enough for their local searches, for every particle, fast. Matching at the input box up to
the half-map FSC crossing re-does the host's high-resolution work at a cost of ``N x D^2`` per candidate,
so the job works smaller (issue 25):

1. **Ab initio on a subset** (when there are more kept particles than ``subset_size``): the global passes
   run until the map settles on ``subset_size`` particles drawn at random, balanced over the two half
   sets, at the **ab initio box** (Fourier-cropped to at most ``AB_INITIO_BOX``: the global passes match
   at most ``global_max_shells`` shells, which that box holds).
2. **Every particle**: one global pass assigns every kept particle against the settled half maps (each
   against its own half's map: the halves stay independent), finding junk among them all; then the local
   iterations, all at the **local box**: the smallest (even) box whose Nyquist limit reaches
   ``target_resolution`` (the input box if that is finer than the input allows), or without a target a box
   of ``AB_INITIO_BOX``; with a coarser search than small sets get (``LOCAL_SEARCH_AT_SCALE``).
3. The job reconstructs the final maps at the input box from every kept particle in one streamed pass
   (:mod:`cryofastar_core.job.maps`) unless the local box is the input box (then refinement's own last
   maps are those maps).

Images are Fourier-cropped as they are read (:func:`cropped_loader`), so nothing larger than one chunk
of input-box images is ever in memory; during the refine stage each cropped image is kept in a scratch
file the first time it is made (:func:`scratch_for`), so later passes read it instead of cropping again.
Poses keep one meaning at every box: rotations are unchanged, shifts are in pixels of the box they are used
at (``input px x box / D``), and the pixel size at box ``b`` is ``apix x D / b``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from cryofastar_core.io import ParticleSet
from cryofastar_core.io.scratch import ImageScratch
from cryofastar_core.physics.fourier import fourier_crop

AB_INITIO_BOX = 64
MIN_LOCAL_BOX = 32  # a soft mask and a few shells past the global passes' band (global_max_shells) fit
LOCAL_SEARCH_AT_SCALE = {"angle_step_deg": 7.5, "step_motion_px": 1.0}


@dataclass(frozen=True)
class WorkScale:
    """Where refinement works: ``ab_initio_box`` and ``subset`` (positions into the refined particles,
    ``None``: no separate ab initio, every particle from the start) and ``local_box``; ``box`` is the input's."""

    box: int
    ab_initio_box: int
    local_box: int
    subset: np.ndarray | None
    local_search: dict = field(default_factory=dict)  # RefineConfig settings of the every-particle phase

    def to_dict(self) -> dict:
        return {"input_box": self.box, "ab_initio_box": self.ab_initio_box, "local_box": self.local_box,
                "ab_initio_particles": None if self.subset is None else int(len(self.subset))}


def local_box_for(box: int, apix: float, target_resolution: float | None) -> int:
    """The box the local iterations work at: for ``target_resolution`` Å, the smallest even box whose Nyquist
    limit (``2 apix box / b`` Å) reaches it, at least ``MIN_LOCAL_BOX``; without one, ``AB_INITIO_BOX`` (the
    measured default: ``bench/scale_benchmark.py``); never more than the input ``box``."""
    if target_resolution is None:
        return min(box, AB_INITIO_BOX)
    need = 2 * math.ceil(box * apix / target_resolution)
    return int(min(box, max(need, MIN_LOCAL_BOX)))


def balanced_subset(half: np.ndarray, size: int, seed: int) -> np.ndarray | None:
    """``size`` positions drawn at random, half from each half set (sorted), or ``None`` when ``size`` is 0
    or not fewer than ``len(half)``: then every particle is refined from the start."""
    n = len(half)
    if size <= 0 or size >= n:
        return None
    rng = np.random.default_rng(seed)
    parts = []
    for k, want in ((1, size // 2), (2, size - size // 2)):
        members = np.flatnonzero(half == k)
        parts.append(rng.choice(members, size=min(want, len(members)), replace=False))
    return np.sort(np.concatenate(parts))


def plan_work(box: int, apix: float, half: np.ndarray, target_resolution: float | None, subset_size: int,
              seed: int) -> WorkScale:
    """The :class:`WorkScale` of a run refining the particles of half sets ``half`` ``(n,)``."""
    subset = balanced_subset(half, subset_size, seed)
    local = local_box_for(box, apix, target_resolution)
    ab_initio = min(local, AB_INITIO_BOX) if subset is not None else local
    return WorkScale(box=box, ab_initio_box=ab_initio, local_box=local, subset=subset,
                     local_search=dict(LOCAL_SEARCH_AT_SCALE) if subset is not None else {})


def cropped_loader(particles: ParticleSet, indices: np.ndarray, box: int,
                   device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """``load(local)`` -> images ``(n, box, box)`` float32 on ``device`` of the particles ``indices[local]``,
    contrast sign applied, Fourier-cropped from the input box to ``box`` as they are read (once per run
    when the set has a scratch: :func:`scratch_for`)."""

    def read(g: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(particles.read_signed_images(g), dtype=torch.float32, device=device)

    def crop(g: np.ndarray) -> torch.Tensor:
        return fourier_crop(read(g), box)

    def load(local: np.ndarray) -> torch.Tensor:
        g = indices[local]
        if box == particles.box:
            return read(g)
        if particles.scratch is None:
            return crop(g)
        kept = particles.scratch.read(g, box, lambda miss: crop(miss).cpu().numpy())
        return torch.from_numpy(kept).to(device)

    return load


@contextmanager
def scratch_for(particles: ParticleSet, folder: Path, rank: int = 0) -> Iterator[None]:
    """While inside, ``particles`` keeps the images it is read at a cropped box in files under ``folder``
    (:class:`~cryofastar_core.io.scratch.ImageScratch`, one per rank of a distributed run); they are removed
    on the way out, however it is left."""
    particles.scratch = ImageScratch(folder, len(particles), tag=f"rank{rank}_")
    try:
        yield
    finally:
        particles.scratch.close()
        particles.scratch = None
