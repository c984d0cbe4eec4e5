"""Local pose refinement by projection matching, alternating with gold-standard reconstruction.

What it does: starting from given poses (the feed-forward estimate), each iteration

1. takes the two current half maps (gold standard: a particle of half set ``h`` is only ever compared
   with the map of half set ``h``, so the half maps stay independent and their FSC stays honest),
2. for every particle, scores candidate poses in a neighbourhood of its current pose against projections
   of its own half map and keeps the best one,
3. back-projects the particle with its new pose into new half maps (same pass over the data), and
4. reports the FSC between the new half maps.

Before the local iterations, a **global pass** (``global_step_deg``, default 15°; ``None``: off) scores
every particle at every orientation of a uniform grid against its own half map
(:mod:`cryofastar_core.refine.global_pass`), shifts within ``global_shift_radius_px`` of the current ones,
and keeps the best unless the particle's current pose already scores higher (``global_keep_better``: a
good feed-forward pose is not traded for the nearest grid point, 7° away on average). Starting poses
tens of degrees off are brought within the grid spacing, which the first local iteration (a ball of
15°) then covers. It matches only shells up to ``global_max_shells`` (and the FSC = 0.5 crossing), where
a 15° grid moves a sample by at most about one pixel. The passes repeat (each against the maps of the
previous one) until fewer than ``global_settle_fraction`` of the particles move by more than half the
grid step, at most ``global_passes`` times.

**One frame for both halves.** The halves are refined apart (gold standard), so each half's poses are
defined only up to its own map's frame, and against a blurred starting map the two frames drift apart
(measured by ``bench/refine_benchmark.py``: ``bench/results/2026-12-06-refinement.md``). Before every pass,
half 2's map is registered onto half 1's by a rotation and a 3D offset (:mod:`cryofastar_core.refine.map_registration`,
shells weighted by their FSC signal-to-noise, ``register_halves``, offsets up to ``register_max_shift_px``;
during global passes over all rotations and both hands, since from a blurred start a half can settle in
the mirror image; during local iterations within ``register_radius_deg``), and half 2's new poses and
shifts follow it as they are made, so the next maps share one frame; the frame is shared, nothing else.

**Junk.** Every global pass also weighs each particle's evidence for its pose against what structureless
images of the same data score (:mod:`cryofastar_core.refine.junk`); particles with none are left out of
the maps from the next pass on (``exclude_junk``), and reported.

**Pose mates.** A pseudo-symmetric structure (nearly symmetric under a half turn) lets the low-resolution
global passes split its particles between a pose and its mate, which local searches cannot undo; with
``mate_passes`` the driver finds the map's mate before the last local iteration and lets every particle
choose between the two against its own half map until the split resolves
(:mod:`cryofastar_core.refine.mates`); the last iteration then refines the poses and shifts chosen.

**One origin.** The frame's origin is as free as its orientation and drifts over the passes. With
``centre_origin`` the shifts are moved so that the maps' centre of mass sits at the box centre, and the
maps are rebuilt from them (one more reconstruction pass): the origin the feed-forward shifts (image
centroids) define. What it gains in shift error and map resolution: ``bench/refine_benchmark.py``, results
in ``bench/results/2026-12-06-refinement.md``.

Choices, and why:

* **Candidates.** Rotations ``R @ exp(omega)`` for ``omega`` on a cubic grid of spacing ``step`` inside a
  ball of radius ``radius`` (both in degrees; ``R`` maps image to map coordinates, so ``exp(omega)`` is a
  small rotation about image-frame axes: its z component is the in-plane angle). The same perturbation
  set is used for every particle, so the projections of a batch form one ``project_at`` call (only the
  band's samples are projected). Shifts:
  ``s + delta`` for ``delta`` on a square grid of spacing ``shift_step`` inside a disc of
  ``shift_radius`` (pixels of the input box), scored for every rotation candidate at once as a matrix
  product with phase ramps (cheaper than projecting again, and exact at sub-pixel offsets).
* **Coarse to fine.** Both steps and both radii are multiplied by ``shrink`` after every iteration
  (default 0.5: 5° in a ball of 15° (123 rotations), then 2.5°/7.5°, 1.25°/3.75°, ...). The frequency band used in
  matching grows with the data: the first iteration uses shells up to the half-map FSC = 0.5 crossing, later
  ones the FSC = 0.143 crossing, each plus ``extra_shells``, clamped to ``[min_shells, max_shells]``.
* **Cropping.** Matching runs on a Fourier-cropped box ``d = 2 (ceil(r_lim) + 2) <= D`` (the half map is
  Fourier-cropped to ``d`` before projection, the image transforms are cut to the same frequencies), so a
  coarse iteration costs a fraction of a fine one. Frequencies stay in cycles per input pixel, so shifts
  are always in input pixels.
* **Score.** A normalised, CTF-aware, noise-whitened cross-correlation over the half plane of
  frequencies ``1 <= |k| <= r_lim`` (Friedel symmetry of real images makes the other half redundant; DC
  is skipped because it only carries the ice/background level):
  ``score = Re sum_k conj(f c P) X e^{-2 pi i k.(s + delta)} / N  /  sqrt(sum_k |f c P|^2 / N)``
  with ``X`` the image transform, ``P`` the projection, ``c`` the CTF, ``f`` the reference's FSC weight
  (``max(FSC_half, 0)`` per shell, a Wiener-like down-weighting of shells the half map does not know
  well) and ``N`` the radially averaged power spectrum of the images (measured during the previous pass
  over the data; at low SNR it is close to the noise spectrum). The image norm is the same for every
  candidate and is left out. This is the matched filter of a Gaussian noise model with an unknown
  per-image scale; it needs no absolute greyscale.
* **References.** Each half map is multiplied by a soft spherical mask (``mask_radius``, ``mask_width``)
  before projection and before the FSC used for scheduling and reporting (the "masked FSC").
* **Result.** ``soft`` (default): the posterior mean of the grid offsets under weights
  ``exp(max(score, 0)^2)`` (for whitened scores, ``score^2`` is the Gaussian log-likelihood maximised over an
  unknown positive scale; using the image power, which includes the signal, instead of the noise power
  tempers it). At low SNR this damps the noise-driven jumps of the arg-max; at high SNR it is the arg-max.
  Otherwise the best grid point, refined per axis by a parabola through its grid neighbours (``subgrid``).
  Rotations are composed in float64 on the CPU and re-orthonormalised, so repeated composition does not
  drift from SO(3).
* **Precision.** An angle is only as precise as the motion it causes at the particle's edge: at box 32 with
  a particle radius of ~8 px, 1 degree is 0.14 px, so noisy small-box tests converge only to a degree or
  so (the bounds in ``tests/test_refine.py``).

Memory and cost: images are read ``chunk_size`` at a time through ``load_images`` (never all ``N``); only
poses (``N x 11`` float64) live for the whole run. Within a chunk, particles are matched in batches of
``b = max(1, batch_points // (J d^2))`` with ``J`` the number of rotation candidates; the projection of one
batch holds the ``P < d^2`` band samples of each candidate with their trilinear weights, well under
**350 bytes x b x J x d^2**, i.e. ~350 MB with the default ``batch_points = 2**20``. The two back-projectors
hold ``2 x (pad D)^3 x 12`` bytes. The work is linear in ``N``: one read, ``J`` projections of ``P``
samples and ``J x T`` scores per particle per iteration (``T`` shift candidates), plus one insertion.
Everything runs on ``device`` (CPU or GPU); ``load_images`` may return tensors on any device.

Layout: :func:`refine_poses` below only sequences the passes; they share one
:class:`~cryofastar_core.refine.state.RefineState` (poses, half sets, maps, back-projectors, spectrum,
history). :mod:`~cryofastar_core.refine.passes`: the starting maps, the global passes and the local
iterations; :mod:`~cryofastar_core.refine.scan`: one matching pass over the data (reading, half frame,
insertion, history fields); :mod:`~cryofastar_core.refine.origin`: the origin move and the final maps;
:mod:`~cryofastar_core.refine.config`: :class:`RefineConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.refine.config import RefineConfig, matching_shells
from cryofastar_core.refine.grids import perturbation_grid, shift_grid
from cryofastar_core.refine.mates import resolve_mates
from cryofastar_core.refine.origin import final_maps, move_origin
from cryofastar_core.refine.passes import global_search, initial_maps, local_iteration
from cryofastar_core.refine.state import start_state
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress

# RefineConfig, matching_shells, perturbation_grid and shift_grid live in config.py and grids.py; they are
# imported here too because callers outside refine/ (job, bench, tests) import them from the driver.
__all__ = ["RefineConfig", "RefineResult", "matching_shells", "perturbation_grid", "refine_poses", "shift_grid"]


@dataclass
class RefineResult:
    """Output of :func:`refine_poses`.

    ``rotations`` ``(N, 3, 3)`` and ``shifts`` ``(N, 2)``: refined poses, float64 on the CPU.
    ``history``: one dict per reconstruction, in order: the starting poses (``stage`` "start"), the global
    pass if it ran ("global"), then each local iteration ("local", ``iteration`` 1, 2, ...), with the
    masked half-map FSC (``fsc``, per shell), ``resolution_0143``/``resolution_05`` (Å), ``seconds`` and,
    after the start, the search settings used and how far the poses moved (``median_rotation_change_deg``).
    ``half1``, ``half2``, ``full``: the final maps ``(D, D, D)`` on ``device`` (unmasked), without the junk
    when ``exclude_junk``. ``junk`` ``(N,)`` bool: the particles the last global pass found no evidence
    for; ``junk_score`` ``(N,)``: every particle's evidence score (low for junk); ``junk_rule``: what the
    decision rested on (:mod:`cryofastar_core.refine.junk`). ``None`` / empty without a global pass.
    """

    rotations: Tensor
    shifts: Tensor
    history: list[dict] = field(default_factory=list)
    half1: Tensor | None = None
    half2: Tensor | None = None
    full: Tensor | None = None
    junk: Tensor | None = None
    junk_score: Tensor | None = None
    junk_rule: dict = field(default_factory=dict)


def refine_poses(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float,
                 rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray, half_set: Tensor | np.ndarray,
                 cfg: RefineConfig | None = None, device: torch.device | str | None = None,
                 progress: Progress | None = None,
                 initial_half_maps: tuple[Tensor, Tensor] | None = None,
                 on_stage: Callable[[dict, Tensor, Tensor], None] | None = None,
                 comm: Communicator | None = None) -> RefineResult:
    """Refine ``N`` poses locally; see the module docstring.

    ``load_images(idx)``: ``idx`` ``(n,)`` int64 indices into ``0..N-1`` -> real images ``(n, D, D)``
    (contrast sign applied, at the reconstruction box). ``ctf``: per-particle parameters in the same order
    (``None``: no CTF). ``apix``: Å/px of the images. ``rotations`` ``(N, 3, 3)`` (internal convention),
    ``shifts`` ``(N, 2)`` px, ``half_set`` ``(N,)`` in {1, 2}. ``initial_half_maps``: half maps of the
    starting poses if the caller already has them (saves one pass over the data). ``progress(stage, done,
    total)`` is called after every chunk. ``on_stage(entry, rotations, shifts)``, if given, is called after
    every stage with its history entry and the poses it produced (read-only views: copy to keep them), so
    a caller that knows the truth (a benchmark) can follow each stage.

    ``comm`` (several ranks, every one calling this with the same arguments): each rank reads and matches
    only its own contiguous block of the particles in every pass; after each pass the back-projectors, the
    power spectrum and the poses are summed over the ranks, so every rank goes on from the same maps and
    returns the same result (equal to one process up to the order of the sums; with ``initial_half_maps``
    the first pass whitens with every rank's first chunk, one process with its first chunk only). Give
    ``progress`` on one rank only: it reports that rank's block scaled to the whole.
    """
    cfg = cfg or RefineConfig()
    cfg.validate()
    st = start_state(load_images, ctf, apix, rotations, shifts, half_set, cfg, device, progress, on_stage, comm)
    initial_maps(st, initial_half_maps)
    global_search(st)
    for it in range(cfg.iterations):
        if it == cfg.iterations - 1:
            resolve_mates(st)   # before the last local iteration, which refines the mates' poses and shifts
        local_iteration(st, it)
    if cfg.centre_origin and len(st.history) > 1:
        move_origin(st)
    full = final_maps(st)
    return RefineResult(rotations=st.R, shifts=st.s, history=st.history, half1=st.maps[0], half2=st.maps[1],
                        full=full, junk=st.junk, junk_score=st.junk_score, junk_rule=st.junk_rule)
