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
(measured: 7° between halves that were each 2.5° from the truth in their own frame). Before every pass,
half 2's map is registered onto half 1's by a rotation and a 3D offset (:mod:`cryofastar_core.refine.map_registration`,
shells weighted by their FSC signal-to-noise, ``register_halves``, offsets up to ``register_max_shift_px``;
during global passes over all rotations and both hands, since from a blurred start a half can settle in
the mirror image; during local iterations within ``register_radius_deg``), and half 2's new poses and
shifts follow it as they are made, so the next maps share one frame; the frame is shared, nothing else.

**One origin.** The frame's origin is as free as its orientation and drifts over the passes (0.75 px
from the model's poses at SNR 0.1). With ``centre_origin`` the shifts are moved so that the maps' centre
of mass sits at the box centre, and the maps are rebuilt from them (one more reconstruction pass): the
origin the feed-forward shifts (image centroids) define. Measured on that run (2,000 particles of an
unseen structure): shift error 0.64 -> 0.20 px, map against the truth 4.83 -> 3.88 Å at FSC 0.5 (3.72 Å
from the true poses).

Choices, and why:

* **Candidates.** Rotations ``R @ exp(omega)`` for ``omega`` on a cubic grid of spacing ``step`` inside a
  ball of radius ``radius`` (both in degrees; ``R`` maps image to map coordinates, so ``exp(omega)`` is a
  small rotation about image-frame axes: its z component is the in-plane angle). The same perturbation
  set is used for every particle, so the projections of a batch form one ``project_ft`` call. Shifts:
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
  a particle radius of ~8 px, 1 degree is 0.14 px, so noisy small-box tests converge to 1-2 degrees.

Memory and cost: images are read ``chunk_size`` at a time through ``load_images`` (never all ``N``); only
poses (``N x 11`` float64) live for the whole run. Within a chunk, particles are matched in batches of
``b = max(1, batch_points // (J d^2))`` with ``J`` the number of rotation candidates; the projection of one
batch peaks at about **350 bytes x b x J x d^2** (gather indices and trilinear weights of ``project_ft``),
i.e. ~350 MB with the default ``batch_points = 2**20``. The two back-projectors hold
``2 x (pad D)^3 x 12`` bytes. The work is linear in ``N``: one read, ``J`` projections of ``d^2``
samples and ``J x T`` scores per particle per iteration (``T`` shift candidates), plus one insertion.
Everything runs on ``device`` (CPU or GPU); ``load_images`` may return tensors on any device.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.geometry import rotation_angle_deg, rotvec_to_matrix
from cryofastar_core.refine.global_pass import best_on_grid, grid_projections, so3_grid
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.refine.map_registration import Registration, register_map, shifts_after_moving_map
from cryofastar_core.refine.matching import FourierBand, PowerSpectrum, candidate_scores
from cryofastar_core.evaluation.metrics import apply_alignment
from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.fourier import fft2c, fourier_crop_volume
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.runtime.progress import Progress
from cryofastar_core.reconstruct import Backprojector, fsc, insert_half_sets, resolution_at, soft_sphere_mask
from cryofastar_core.refine.grids import ball_grid

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RefineConfig:
    """Settings of :func:`refine_poses` (see the module docstring for what each does).

    Angles in degrees, shifts in pixels of the input box, resolution limits in Fourier shells of the
    input box. ``mask_radius`` ``None`` means ``0.45 * D - mask_width``.
    """

    iterations: int = 3
    angle_step_deg: float = 5.0
    angle_radius_deg: float = 15.0
    shift_step_px: float = 1.0
    shift_radius_px: float = 2.0
    shrink: float = 0.5
    first_fsc_threshold: float = 0.5
    fsc_threshold: float = 0.143
    extra_shells: float = 2.0
    min_shells: float = 4.0
    max_shells: float | None = None
    chunk_size: int = 512
    batch_points: int = 1 << 20
    use_ctf: bool = True
    whiten: bool = True
    fsc_weighting: bool = True
    mask_radius: float | None = None
    mask_width: float = 3.0
    pad: int = 2
    subgrid: bool = True
    soft: bool = True
    global_step_deg: float | None = 15.0
    global_passes: int = 20
    global_shift_step_px: float = 1.0
    global_shift_radius_px: float = 3.0
    global_max_shells: float = 8.0
    global_settle_fraction: float = 0.05
    global_keep_better: bool = True
    register_halves: bool = True
    register_radius_deg: float = 20.0
    register_max_shift_px: float = 3.0
    centre_origin: bool = True

    def validate(self) -> None:
        if self.iterations < 0:
            raise ValueError("RefineConfig.iterations must be >= 0")
        for name in ("angle_step_deg", "angle_radius_deg", "shift_step_px", "chunk_size", "batch_points"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RefineConfig.{name} must be > 0")
        if self.shift_radius_px < 0:
            raise ValueError("RefineConfig.shift_radius_px must be >= 0")
        if not 0 < self.shrink <= 1:
            raise ValueError("RefineConfig.shrink must be in (0, 1]")
        if self.pad < 1:
            raise ValueError("RefineConfig.pad must be >= 1")
        if self.global_step_deg is not None and not 3.0 <= self.global_step_deg <= 45.0:
            raise ValueError("RefineConfig.global_step_deg must be None (off) or in [3, 45]")


@dataclass
class RefineResult:
    """Output of :func:`refine_poses`.

    ``rotations`` ``(N, 3, 3)`` and ``shifts`` ``(N, 2)``: refined poses, float64 on the CPU.
    ``history``: one dict per reconstruction, in order: the starting poses (``stage`` "start"), the global
    pass if it ran ("global"), then each local iteration ("local", ``iteration`` 1, 2, ...), with the
    masked half-map FSC (``fsc``, per shell), ``resolution_0143``/``resolution_05`` (Å), ``seconds`` and,
    after the start, the search settings used and how far the poses moved (``median_rotation_change_deg``).
    ``half1``, ``half2``, ``full``: the final maps ``(D, D, D)`` on ``device`` (unmasked).
    """

    rotations: Tensor
    shifts: Tensor
    history: list[dict] = field(default_factory=list)
    half1: Tensor | None = None
    half2: Tensor | None = None
    full: Tensor | None = None


def perturbation_grid(step_deg: float, radius_deg: float) -> Tensor:
    """Rotation vectors ``(J, 3)`` (radians) on a cubic grid of spacing ``step_deg`` inside a ball of
    ``radius_deg``; the identity comes first."""
    g, _ = ball_grid(3, radius_deg / step_deg)
    return torch.deg2rad(g.double() * step_deg)


def shift_grid(step_px: float, radius_px: float) -> Tensor:
    """Shift offsets ``(T, 2)`` (px) on a square grid of spacing ``step_px`` inside a disc of ``radius_px``;
    zero first."""
    g, _ = ball_grid(2, radius_px / step_px)
    return g.double() * step_px


def matching_shells(freq: Tensor, curve: Tensor, box: int, threshold: float, cfg: RefineConfig) -> float:
    """Matching radius (shells of ``box``): the FSC ``threshold`` crossing plus ``extra_shells``, clamped."""
    res = resolution_at(freq, curve, 1.0, threshold)  # apix 1: resolution in px
    cross = box / res if math.isfinite(res) and res > 0 else 0.0
    upper = box / 2 - 1 if cfg.max_shells is None else min(cfg.max_shells, box / 2 - 1)
    return float(min(max(cross + cfg.extra_shells, cfg.min_shells), upper))


def _as_tensor(x, dtype=torch.float64) -> Tensor:
    return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).detach().to("cpu", dtype)


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
    dev = torch.device(device) if device is not None else torch.device("cpu")
    R_all = _as_tensor(rotations)
    s_all = _as_tensor(shifts)
    half = _as_tensor(half_set, torch.int64)
    N = R_all.shape[0]
    if R_all.shape != (N, 3, 3) or s_all.shape != (N, 2) or half.shape != (N,):
        raise ValueError(f"refine_poses: rotations (N,3,3), shifts (N,2), half_set (N,) expected, got "
                         f"{tuple(R_all.shape)}, {tuple(s_all.shape)}, {tuple(half.shape)}")
    if N == 0:
        raise ValueError("refine_poses: no particles")
    if not bool(((half == 1) | (half == 2)).all()):
        raise ValueError("refine_poses: half_set values must be 1 or 2")
    if ctf is not None and len(ctf) != N:
        raise ValueError(f"refine_poses: {len(ctf)} CTF entries for {N} particles")
    use_ctf = ctf if (ctf is not None and cfg.use_ctf) else None
    if use_ctf is not None:
        use_ctf = use_ctf.to(dev)

    dist = comm is not None and comm.distributed
    world = comm.world_size if dist else 1
    own = np.arange(N, dtype=np.int64)
    if dist:
        own = np.array_split(own, world)[comm.rank]

    def local(work: Callable[[], T]) -> T:
        # With several ranks, a failure on one stops them all here, not in a sum after it.
        return comm.check(work) if dist else work()

    D = local(lambda: int(load_images(own[:1] if len(own) else np.zeros(1, dtype=np.int64)).shape[-1]))
    mask = soft_sphere_mask(D, cfg.mask_radius if cfg.mask_radius is not None else 0.45 * D - cfg.mask_width,
                            cfg.mask_width, device=dev)
    R_all = R_all.clone()
    s_all = s_all.clone()
    history: list[dict] = []
    spectrum = PowerSpectrum(D, dev)
    t_start = time.perf_counter()

    def chunks():
        for start in range(0, len(own), cfg.chunk_size):
            idx = own[start:start + cfg.chunk_size]
            imgs = load_images(idx)
            if imgs.shape[1:] != (D, D):
                raise ValueError(f"load_images returned {tuple(imgs.shape)}, expected (n, {D}, {D})")
            yield idx, imgs.to(device=dev, dtype=torch.float32)

    def insert(bps: list[Backprojector], idx: np.ndarray, imgs: Tensor) -> None:
        gi = torch.as_tensor(idx)
        insert_half_sets(bps, imgs, R_all[gi].to(dev, torch.float32), half[gi], shifts=s_all[gi].to(dev, torch.float32),
                         ctf=None if use_ctf is None else use_ctf.index(gi.to(dev)), apix=apix)

    def tick(stage: str, done: int) -> None:
        if progress:
            progress(stage, min(done * world, N), N)  # this rank's block times the ranks: about the whole

    def end_pass(bps: list[Backprojector], spec: PowerSpectrum | None, rows: Sequence[Tensor] = (),
                 values: Sequence[list[Tensor]] = (), counts: Sequence[int] = ()) -> tuple[list[Tensor], list[int]]:
        """After a pass (every rank done: call right after :func:`local`): each rank changed only its own
        particles' rows, so the accumulators, the spectrum, the poses, the per-particle ``values`` (parts
        made for the particles ``rows``) and the ``counts`` are summed over the ranks, so that every rank
        goes on from the same maps and poses and reports the same history. One process: nothing to sum."""
        if not dist:
            return [torch.cat(v) for v in values], list(counts)
        full = [torch.zeros(N, dtype=torch.float64) for _ in values]
        for f, v in zip(full, values):
            if v:
                f[torch.cat(rows)] = torch.cat(v).double()
        totals = torch.tensor(counts, dtype=torch.float64)
        others = torch.ones(N, dtype=torch.bool)
        others[own] = False
        R_all[others], s_all[others] = 0.0, 0.0
        _share(comm, [t for bp in bps for t in (bp.numerator, bp.weight)]
               + ([spec.total, spec.count] if spec is not None else []) + [R_all, s_all, *full]
               + ([totals] if counts else []), dev)
        return full, [int(c) for c in totals.tolist()]

    if initial_half_maps is None:
        bps = [Backprojector(D, device=dev, pad=cfg.pad) for _ in range(2)]

        def initial_pass() -> None:
            done = 0
            for idx, imgs in chunks():
                spectrum.add(fft2c(imgs))
                insert(bps, idx, imgs)
                done += len(idx)
                tick("refine: initial reconstruction", done)

        local(initial_pass)
        end_pass(bps, spectrum)
        maps = [bp.finalize() for bp in bps]
    else:
        maps = [m.to(dev, torch.float32) for m in initial_half_maps]
        bps = None
        if dist:
            # One process whitens the first pass with its first chunk's power (see _on_band); ranks would
            # each take a different chunk, so they take the power of every rank's first chunk, summed.
            def first_power() -> None:
                for _, imgs in chunks():
                    spectrum.add(fft2c(imgs))
                    break

            local(first_power)
            _share(comm, [spectrum.total, spectrum.count], dev)
    freq, curve = fsc(maps[0] * mask, maps[1] * mask)
    history.append(_fsc_entry(0, freq, curve, apix, "start", t_start))

    for gp in range(cfg.global_passes if cfg.global_step_deg is not None else 0):
        t0 = time.perf_counter()
        r_lim = min(matching_shells(freq, curve, D, cfg.first_fsc_threshold, cfg), cfg.global_max_shells)
        band = FourierBand(D, r_lim, dev)
        grid = so3_grid(cfg.global_step_deg)
        deltas = shift_grid(cfg.global_shift_step_px, cfg.global_shift_radius_px)
        refs = [prepare_volume(fourier_crop_volume(m * mask, band.crop), pad=cfg.pad) for m in maps]
        projections = [grid_projections(v, band, grid) for v in refs]
        E_here = band.ramps(deltas.to(dev), torch.float32).T.contiguous()                # (P, T)
        identity = torch.eye(3, dtype=torch.float64)[None]
        filt = _fsc_filter(curve, band, cfg)
        frame = _half_frame(maps, mask, r_lim, curve, cfg, cfg.global_step_deg)
        next_spectrum = PowerSpectrum(D, dev)
        new_bps = [Backprojector(D, device=dev, pad=cfg.pad) for _ in range(2)]
        moved_deg, moved_px, rows = [], [], []

        def global_pass() -> None:
            done = 0
            for idx, imgs, X, w in _on_band(chunks(), band, filt, spectrum, next_spectrum, cfg):
                for k, sel, gi in _by_half(half, idx):
                    ctf_k = None if use_ctf is None else use_ctf.index(gi.to(dev))
                    j, t, best = best_on_grid(projections[k - 1], band, X[sel.to(dev)], s_all[gi], deltas, w, ctf_k,
                                              apix)
                    R_new, s_new = grid[j.cpu()], s_all[gi] + deltas[t.cpu()]
                    if cfg.global_keep_better:
                        # A pose already better than every grid point (a good feed-forward pose) is kept.
                        here = candidate_scores(refs[k - 1], band, X[sel.to(dev)], R_all[gi], s_all[gi], identity,
                                                E_here, w, ctf_k, apix, cfg.batch_points)[:, 0]
                        here_best, here_t = here.max(-1)
                        stay = (here_best >= best).cpu()
                        R_new = torch.where(stay[:, None, None], R_all[gi], R_new)
                        s_new = torch.where(stay[:, None], s_all[gi] + deltas[here_t.cpu()], s_new)
                    moved_deg.append(rotation_angle_deg(R_all[gi], R_new))
                    moved_px.append(torch.linalg.norm(s_new - s_all[gi], dim=-1))
                    rows.append(gi)
                    R_all[gi], s_all[gi] = frame(k, R_new, s_new)
                insert(new_bps, idx, imgs)
                done += len(idx)
                tick("refine: global search", done)

        local(global_pass)
        (moved_deg_t, moved_px_t), _ = end_pass(new_bps, next_spectrum, rows, (moved_deg, moved_px))
        spectrum = next_spectrum
        maps = [bp.finalize() for bp in new_bps]
        bps = new_bps
        freq, curve = fsc(maps[0] * mask, maps[1] * mask)
        entry = _fsc_entry(gp + 1, freq, curve, apix, "global", t0)
        entry.update(angle_step_deg=float(cfg.global_step_deg), n_rotations=int(grid.shape[0]),
                     n_shifts=int(deltas.shape[0]), match_shells=r_lim, match_resolution=float(D * apix / r_lim),
                     match_box=band.crop, median_rotation_change_deg=float(moved_deg_t.median()),
                     mean_rotation_change_deg=float(moved_deg_t.mean()),
                     median_shift_change_px=float(moved_px_t.median()),
                     half2_registration_deg=frame.angle_deg, half2_registration_px=frame.offset_px,
                     fraction_moved=float((moved_deg_t > cfg.global_step_deg / 2).double().mean()))
        history.append(entry)
        _log_entry(entry)
        if on_stage:
            on_stage(entry, R_all, s_all)
        if entry["fraction_moved"] < cfg.global_settle_fraction:
            break  # the assignment has settled within the grid: the local iterations take over

    for it in range(cfg.iterations):
        t0 = time.perf_counter()
        scale = cfg.shrink ** it
        a_step, a_rad = cfg.angle_step_deg * scale, cfg.angle_radius_deg * scale
        s_step, s_rad = cfg.shift_step_px * scale, cfg.shift_radius_px * scale
        thr = cfg.first_fsc_threshold if it == 0 else cfg.fsc_threshold
        r_lim = matching_shells(freq, curve, D, thr, cfg)
        band = FourierBand(D, r_lim, dev)
        g_rot, nb_rot = ball_grid(3, a_rad / a_step)
        g_sh, nb_sh = ball_grid(2, s_rad / s_step)
        omegas = torch.deg2rad(g_rot.double() * a_step)                      # (J, 3) rad
        deltas = g_sh.double() * s_step                                      # (T, 2) px
        perturb = rotvec_to_matrix(omegas)                                   # (J, 3, 3) float64 CPU
        nbs = (nb_rot.to(dev), nb_sh.to(dev)) if cfg.subgrid else None
        grids = (g_rot.to(dev, torch.float32), g_sh.to(dev, torch.float32)) if cfg.soft else None
        E = band.ramps(deltas.to(dev), torch.float32).T.contiguous()         # (P, T)
        refs = [prepare_volume(fourier_crop_volume(m * mask, band.crop), pad=cfg.pad) for m in maps]
        filt = _fsc_filter(curve, band, cfg)
        frame = _half_frame(maps, mask, r_lim, curve, cfg)
        next_spectrum = PowerSpectrum(D, dev)
        new_bps = [Backprojector(D, device=dev, pad=cfg.pad) for _ in range(2)]
        moved_deg, moved_px, rows, at_edge = [], [], [], [0, 0]  # at_edge: rotations, shifts
        # Grid points missing a neighbour: the best score there may lie outside the searched region.
        n_edge_rot = (nb_rot < 0).any(-1).any(-1)
        n_edge_shift = (nb_sh < 0).any(-1).any(-1)
        stage = f"refine {it + 1}/{cfg.iterations}"

        def local_pass() -> None:
            done = 0
            for idx, imgs, X, w in _on_band(chunks(), band, filt, spectrum, next_spectrum, cfg):
                for k, sel, gi in _by_half(half, idx):
                    best_j, best_t, frac_r, frac_s = _match(
                        refs[k - 1], band, X[sel.to(dev)], R_all[gi], s_all[gi], perturb, E, w,
                        None if use_ctf is None else use_ctf.index(gi.to(dev)), apix, cfg.batch_points, nbs, grids)
                    best_j, best_t = best_j.cpu(), best_t.cpu()
                    omega = omegas[best_j] + torch.deg2rad(frac_r.cpu().double() * a_step)
                    R_new = R_all[gi] @ rotvec_to_matrix(omega)
                    s_new = s_all[gi] + deltas[best_t] + frac_s.cpu().double() * s_step
                    moved_deg.append(rotation_angle_deg(R_all[gi], R_new))
                    moved_px.append(torch.linalg.norm(s_new - s_all[gi], dim=-1))
                    rows.append(gi)
                    at_edge[0] += int(n_edge_rot[best_j].sum())
                    at_edge[1] += int(n_edge_shift[best_t].sum())
                    R_all[gi], s_all[gi] = frame(k, _orthonormalise(R_new), s_new)
                insert(new_bps, idx, imgs)
                done += len(idx)
                tick(stage, done)

        local(local_pass)
        (moved_deg_t, moved_px_t), (edge_rot, edge_shift) = end_pass(new_bps, next_spectrum, rows,
                                                                     (moved_deg, moved_px), tuple(at_edge))
        spectrum = next_spectrum
        maps = [bp.finalize() for bp in new_bps]
        bps = new_bps
        freq, curve = fsc(maps[0] * mask, maps[1] * mask)
        entry = _fsc_entry(it + 1, freq, curve, apix, "local", t0)
        entry.update(
            angle_step_deg=a_step, angle_radius_deg=a_rad, shift_step_px=s_step, shift_radius_px=s_rad,
            n_rotations=int(omegas.shape[0]), n_shifts=int(deltas.shape[0]), match_shells=r_lim,
            match_resolution=float(D * apix / r_lim), match_box=band.crop,
            median_rotation_change_deg=float(moved_deg_t.median()), mean_rotation_change_deg=float(moved_deg_t.mean()),
            median_shift_change_px=float(moved_px_t.median()),
            fraction_rotation_at_edge=edge_rot / N, fraction_shift_at_edge=edge_shift / N,
            half2_registration_deg=frame.angle_deg, half2_registration_px=frame.offset_px)
        history.append(entry)
        _log_entry(entry)
        if on_stage:
            on_stage(entry, R_all, s_all)

    if cfg.centre_origin and len(history) > 1:
        # See "One origin" in the module docstring. The maps are rebuilt from the moved shifts rather than
        # moved themselves, so they stay exactly the reconstruction of the poses returned.
        both = maps[0] + maps[1]
        t = torch.zeros(3, dtype=torch.float64, device=both.device)
        for _ in range(3):  # the fixed mask sees a little more or less of a moved map: settle
            t = t - volume_centroid(shift_volume(both, t), mask)
        s_all = shifts_after_moving_map(R_all, s_all, t.cpu())
        history[-1]["origin_moved_px"] = float(t.norm())
        log.info("refined map's centre of mass moved to the box centre (%.2f px)", float(t.norm()))
        bps = None
    if bps is None:
        # No iteration ran and the caller supplied the maps, or the origin moved: rebuild the maps.
        bps = [Backprojector(D, device=dev, pad=cfg.pad) for _ in range(2)]

        def rebuild() -> None:
            for idx, imgs in chunks():
                insert(bps, idx, imgs)

        local(rebuild)
        end_pass(bps, None)
        maps = [bp.finalize() for bp in bps]
    full = bps[0].add_(bps[1]).finalize()
    return RefineResult(rotations=R_all, shifts=s_all, history=history, half1=maps[0], half2=maps[1], full=full)


def _share(comm: Communicator, tensors: list[Tensor], dev: torch.device) -> None:
    """Sum ``tensors`` over the ranks in place, every rank getting the sum; call only when every rank is
    known to be here (right after a ``check``). Tensors off ``dev`` go through it: NCCL sums no CPU tensors."""
    staged = [t if t.device == dev else t.to(dev) for t in tensors]
    comm.reduce_sum_(staged, dst=None)
    for t, u in zip(tensors, staged):
        if u is not t:
            t.copy_(u)


def _match(vft, band: FourierBand, X: Tensor, R: Tensor, s: Tensor, perturb: Tensor, E: Tensor, w: Tensor,
           ctf: CTFParams | None, apix: float, batch_points: int,
           neighbours: tuple[Tensor, Tensor] | None = None,
           soft_grids: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best candidate per particle: indices into ``perturb`` ``(J, 3, 3)`` and into the shift grid, and the
    sub-grid offsets ``(n, 3)``, ``(n, 2)`` in grid steps (zeros without ``neighbours``).

    Arguments as :func:`candidate_scores`, plus ``neighbours``: ``(J, 3, 2)`` and ``(T, 2, 2)``
    grid-neighbour indices (see :func:`_ball_grid`) for the parabolic sub-grid peak; ``soft_grids``: the
    integer grids ``(J, 3)``, ``(T, 2)``: if given, the offsets instead move the best grid point to the
    posterior mean under weights ``exp(max(score, 0)^2)``.
    """
    score = candidate_scores(vft, band, X, R, s, perturb, E, w, ctf, apix, batch_points)
    n, J, T = score.shape
    dev = score.device
    flat = score.reshape(n, J * T).argmax(-1)
    j, t = flat // T, flat % T
    frac_r = torch.zeros(n, 3, device=dev)
    frac_s = torch.zeros(n, 2, device=dev)
    if soft_grids is not None:
        ll = score.clamp_min(0.0) ** 2
        p = torch.softmax(ll.reshape(n, J * T), -1).reshape(n, J, T)
        g_r, g_s = soft_grids
        frac_r = p.sum(2) @ g_r - g_r[j]
        frac_s = p.sum(1) @ g_s - g_s[t]
    elif neighbours is not None:
        rows = torch.arange(n, device=dev)
        s0 = score[rows, j, t]
        nb_r, nb_s = neighbours
        frac_r = _parabolic_peak(s0, nb_r[j], lambda idx: score[rows[:, None, None], idx, t[:, None, None]])
        frac_s = _parabolic_peak(s0, nb_s[t], lambda idx: score[rows[:, None, None], j[:, None, None], idx])
    return j, t, frac_r, frac_s


def _parabolic_peak(s0: Tensor, nb: Tensor, lookup: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-axis vertex of the parabola through the scores at ``-1, 0, +1`` grid steps, ``(m, ndim)`` in steps.

    ``s0`` ``(m,)``: score at the best point; ``nb`` ``(m, ndim, 2)``: neighbour indices (``-1``: none, then
    the offset is 0); ``lookup(idx)`` returns the scores at ``idx`` ``(m, ndim, 2)``. Clamped to half a
    step, i.e. the point stays in the best grid cell.
    """
    have = (nb >= 0).all(-1)
    sc = lookup(nb.clamp_min(0))
    sm, sp = sc[..., 0], sc[..., 1]
    curv = sm - 2 * s0[:, None] + sp
    ok = have & (curv < 0)
    off = 0.5 * (sm - sp) / torch.where(ok, curv, torch.ones_like(curv))
    return torch.where(ok, off.clamp(-0.5, 0.5), torch.zeros_like(off))


def _orthonormalise(R: Tensor) -> Tensor:
    """Nearest rotations (SVD polar factor) of ``(n, 3, 3)`` float64 matrices."""
    U, _, Vh = torch.linalg.svd(R)
    d = torch.sign(torch.linalg.det(U @ Vh))
    U = U.clone()
    U[:, :, -1] *= d[:, None]
    return U @ Vh


def _log_entry(entry: dict) -> None:
    name = "global pass" if entry["stage"] == "global" else "local iteration"
    log.info("refinement %s %d: poses moved %.1f deg (median), half-map FSC 0.143 at %.1f Å, %.1f s", name,
             entry["iteration"], entry["median_rotation_change_deg"], entry["resolution_0143"], entry["seconds"])


def _fsc_filter(curve: Tensor, band: FourierBand, cfg: RefineConfig) -> Tensor:
    """Per band sample, ``max(FSC, 0)`` of its shell (ones without ``fsc_weighting``), float64."""
    filt = torch.ones(band.shell.shape, dtype=torch.float64, device=band.shell.device)
    if cfg.fsc_weighting:
        filt = filt * curve.to(filt.device)[band.shell.clamp(max=curve.numel() - 1)].clamp(0.0, 1.0)
    return filt


class _HalfFrame:
    """Puts half 2's new poses into half 1's frame (``G R``, shifts moved with the map's offset ``t``; see
    :mod:`cryofastar_core.refine.map_registration`) as they are made, so the next maps of both halves share one
    frame."""

    def __init__(self, reg: Registration | None):
        self.reg = reg

    @property
    def angle_deg(self) -> float:
        return 0.0 if self.reg is None else self.reg.angle_deg

    @property
    def offset_px(self) -> float:
        return 0.0 if self.reg is None else float(self.reg.t.norm())

    def __call__(self, k: int, R: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        if k != 2 or self.reg is None:
            return R, s
        R_new = apply_alignment(R, self.reg.G, self.reg.mirrored)
        return R_new, self.reg.shifts_for(R_new, s)


def _half_frame(maps: list[Tensor], mask: Tensor, shells: float, curve: Tensor, cfg: RefineConfig,
                coarse_step_deg: float | None = None) -> _HalfFrame:
    """The rotation that registers half 2's map onto half 1's (identity without ``register_halves``);
    shells weighted by their signal-to-noise ratio from the half maps' FSC ``curve``. Within
    ``register_radius_deg`` of the identity, or over all rotations (a grid of ``coarse_step_deg``): during
    the global passes the halves' frames can be any distance apart, and of either hand (from a blurred
    starting map a half can settle in the mirror image)."""
    if not cfg.register_halves:
        return _HalfFrame(None)
    f = curve.to(torch.float64).clamp(0.0, 0.99)
    reg = register_map(maps[1] * mask, maps[0] * mask, shells, radius_deg=cfg.register_radius_deg,
                       coarse_step_deg=coarse_step_deg, allow_mirror=coarse_step_deg is not None,
                       shell_weights=f / (1 - f), max_shift_px=cfg.register_max_shift_px)
    return _HalfFrame(reg)


def _by_half(half: Tensor, idx: np.ndarray):
    """``(k, sel, gi)`` for each half set ``k`` present in the chunk ``idx``: positions in the chunk and
    global indices of its particles, so each half is matched only against its own map."""
    for k in (1, 2):
        sel = torch.nonzero(half[idx] == k).flatten()
        if sel.numel():
            yield k, sel, torch.as_tensor(idx)[sel]


def _on_band(chunks, band: FourierBand, filt: Tensor, spectrum: PowerSpectrum, next_spectrum: PowerSpectrum,
             cfg: RefineConfig):
    """``(idx, images, X, w)`` per chunk: ``X`` ``(n, P)`` the image transforms on ``band``, ``w`` the matched
    filter's weight. The images' power goes into ``next_spectrum`` (the next pass's whitening), and into
    ``spectrum`` too while it is empty (the caller gave the starting half maps: the first chunk's is used)."""
    for idx, imgs in chunks:
        ft = fft2c(imgs)
        next_spectrum.add(ft)
        if not spectrum.ready():
            spectrum.add(ft)
        yield idx, imgs, ft.reshape(ft.shape[0], -1)[:, band.idx_full], _match_weight(filt, spectrum, band, cfg)


def _match_weight(filt: Tensor, spectrum: PowerSpectrum, band: FourierBand, cfg: RefineConfig) -> Tensor:
    """The matched filter's weight per band sample: FSC weight over noise power (when whitening)."""
    if cfg.whiten and spectrum.ready():
        filt = filt / spectrum.mean()[band.shell].clamp_min(1e-30)
    return filt.to(torch.float32)


def _fsc_entry(iteration: int, freq: Tensor, curve: Tensor, apix: float, stage: str, t0: float) -> dict:
    return dict(stage=stage, iteration=iteration, seconds=round(time.perf_counter() - t0, 3),
                resolution_0143=float(resolution_at(freq, curve, apix, 0.143)),
                resolution_05=float(resolution_at(freq, curve, apix, 0.5)),
                fsc=[round(float(v), 5) for v in curve.cpu()])
