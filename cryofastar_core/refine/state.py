"""The one object that refinement's passes share (:class:`RefineState`), and how a run sets it up.

Every pass of :func:`cryofastar_core.refine.driver.refine_poses` reads the current poses and half maps
from the state, streams this rank's particles through it, and leaves new poses and maps in it for the
next pass. The state also owns the few operations every pass needs in the same form: reading chunks,
inserting them into a pair of back-projectors, reporting progress, and summing a pass's results over the
ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.fourier import fourier_crop_volume
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.reconstruct import Backprojector, fsc, insert_half_sets, soft_sphere_mask
from cryofastar_core.refine.config import RefineConfig
from cryofastar_core.refine.matching import FourierBand, PowerSpectrum
from cryofastar_core.runtime.memory import release_free_memory
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress

T = TypeVar("T")
OnStage = Callable[[dict, Tensor, Tensor], None]


@dataclass(eq=False)
class RefineState:
    """What the passes of one refinement run share.

    Inputs, fixed for the run: ``cfg``; ``load_images(idx)`` ``(n,)`` -> images ``(n, D, D)``; ``ctf``
    (per particle, on ``device``; ``None``: no CTF used); ``apix``; ``comm``; ``progress``; ``on_stage``;
    ``half`` ``(N,)`` int64 in {1, 2}; ``own``: this rank's particle indices (all of them with one
    process); ``box`` ``D``; ``mask`` ``(D, D, D)`` on ``device``, the soft sphere the references and the
    FSC see; ``started``: ``time.perf_counter()`` at the start, for the history's first entry.

    Carried from pass to pass: ``R`` ``(N, 3, 3)`` and ``s`` ``(N, 2)``, the current poses (float64 on
    the CPU; a pass changes this rank's rows in place, :meth:`end_pass` sums them over the ranks);
    ``maps``, the two half maps ``(D, D, D)`` on ``device``; ``bps``, their back-projectors, or ``None``
    where the maps are not the reconstruction of the current poses (given by the caller, or the origin
    moved); ``freq``, ``curve`` ``(S,)``, the masked FSC of ``maps``; ``spectrum``, the images' power the
    next pass whitens with; ``history``, one dict per reconstruction (see
    :class:`~cryofastar_core.refine.driver.RefineResult`).
    """

    cfg: RefineConfig
    load_images: Callable[[np.ndarray], Tensor]
    ctf: CTFParams | None
    apix: float
    device: torch.device
    comm: Communicator | None
    progress: Progress | None
    on_stage: OnStage | None
    R: Tensor
    s: Tensor
    half: Tensor
    own: np.ndarray
    box: int
    mask: Tensor
    spectrum: PowerSpectrum
    started: float
    history: list[dict] = field(default_factory=list)
    maps: list[Tensor] = field(default_factory=list)
    bps: list[Backprojector] | None = None
    freq: Tensor | None = None
    curve: Tensor | None = None
    junk: Tensor | None = None  # (N,) bool: particles the last global pass found no evidence for (refine/junk.py)
    junk_score: Tensor | None = None  # (N,) float64: their log-evidence in SDs of the good particles'
    junk_rule: dict = field(default_factory=dict)
    subset_maps: list[Tensor] | None = None  # the four sub-half maps of the last pass that made them (subsets)

    @property
    def n(self) -> int:
        """Number of particles ``N`` (all ranks)."""
        return self.R.shape[0]

    @property
    def distributed(self) -> bool:
        return self.comm is not None and self.comm.distributed

    @property
    def world(self) -> int:
        return self.comm.world_size if self.distributed else 1

    def on_every_rank(self, work: Callable[..., T], *args) -> T:
        """``work(*args)``, as :func:`on_every_rank`."""
        return on_every_rank(self.comm, work, *args)

    def chunks(self) -> Iterator[tuple[np.ndarray, Tensor]]:
        """``(idx, images)`` per chunk of this rank's particles: indices ``(n,)`` and float32 images
        ``(n, D, D)`` on ``device``; never more than ``chunk_size`` images read at once."""
        D = self.box
        for start in range(0, len(self.own), self.cfg.chunk_size):
            idx = self.own[start:start + self.cfg.chunk_size]
            imgs = self.load_images(idx)
            if imgs.shape[1:] != (D, D):
                raise ValueError(f"load_images returned {tuple(imgs.shape)}, expected (n, {D}, {D})")
            yield idx, imgs.to(device=self.device, dtype=torch.float32)
            release_free_memory()  # the chunk's temporaries are gone: keep resident memory to live data

    def ctf_of(self, gi: Tensor) -> CTFParams | None:
        """The CTF parameters of the particles ``gi`` ``(n,)`` (``None`` where no CTF is used)."""
        return None if self.ctf is None else self.ctf.index(gi.to(self.device))

    def new_backprojectors(self, n: int = 2) -> list[Backprojector]:
        """``n`` empty back-projectors for one pass: half 1 and half 2, or with ``n`` 4 the sub-halves of
        :func:`subsets`."""
        return [Backprojector(self.box, device=self.device, pad=self.cfg.pad) for _ in range(n)]

    def insert_chunk(self, bps: list[Backprojector], idx: np.ndarray, imgs: Tensor, sets: Tensor | None = None) -> None:
        """Insert the chunk ``imgs`` ``(n, D, D)`` of particles ``idx`` at their current poses, each into its
        own half's back-projector (the one half-set routine every reconstruction goes through), or with
        ``sets`` ``(N,)`` (:func:`subsets`) into its sub-half's; particles flagged as junk are left out
        (``exclude_junk``)."""
        labels = self.half if sets is None else sets
        gi = torch.as_tensor(idx)
        if self.junk is not None and self.cfg.exclude_junk:
            use = ~self.junk[gi]
            if not bool(use.any()):
                return
            gi, imgs = gi[use], imgs[use.to(imgs.device)]
        dev = self.device
        insert_half_sets(bps, imgs, self.R[gi].to(dev, torch.float32), labels[gi],
                         shifts=self.s[gi].to(dev, torch.float32), ctf=self.ctf_of(gi), apix=self.apix)

    def insert_all(self, bps: list[Backprojector], sets: Tensor | None = None) -> None:
        """This rank's part of a reconstruction without matching: every chunk into ``bps`` at the current
        poses (:meth:`insert_chunk`)."""
        for idx, imgs in self.chunks():
            self.insert_chunk(bps, idx, imgs, sets)

    def tick(self, stage: str, done: int) -> None:
        """Report ``done`` of this rank's particles in ``stage``."""
        if self.progress:
            N = self.n
            self.progress(stage, min(done * self.world, N), N)  # this rank's block times the ranks: about the whole

    def end_pass(self, bps: list[Backprojector], spec: PowerSpectrum | None, rows: Sequence[Tensor] = (),
                 values: Sequence[list[Tensor]] = (), counts: Sequence[int] = ()) -> tuple[list[Tensor], list[int]]:
        """After a pass (every rank done: call right after :meth:`on_every_rank`): each rank changed only its
        own particles' rows, so the accumulators, the spectrum, the poses, the per-particle ``values``
        (parts made for the particles ``rows``) and the ``counts`` are summed over the ranks, so that every
        rank goes on from the same maps and poses and reports the same history. One process: nothing to
        sum. Returns each of the ``values`` as ``(N,)`` float64 indexed by particle, and the ``counts``."""
        N = self.n
        full = [torch.zeros(N, dtype=torch.float64) for _ in values]
        for f, v in zip(full, values):
            if v:
                f[torch.cat(rows)] = torch.cat(v).double()
        if not self.distributed:
            return full, list(counts)
        totals = torch.tensor(counts, dtype=torch.float64)
        others = torch.ones(N, dtype=torch.bool)
        others[self.own] = False
        self.R[others], self.s[others] = 0.0, 0.0
        share(self.comm, [t for bp in bps for t in (bp.numerator, bp.weight)]
              + ([spec.total, spec.count] if spec is not None else []) + [self.R, self.s, *full]
              + ([totals] if counts else []), self.device)
        return full, [int(c) for c in totals.tolist()]

    def set_maps(self, maps: list[Tensor], bps: list[Backprojector] | None) -> None:
        """Take ``maps`` (two ``(D, D, D)``) as the current half maps, and their masked FSC."""
        self.maps = maps
        self.bps = bps
        self.freq, self.curve = fsc(maps[0] * self.mask, maps[1] * self.mask)

    def set_subset_maps(self, bps: list[Backprojector]) -> None:
        """Take a pass's four sub-half back-projectors (:func:`subsets`): their maps as ``subset_maps``, and
        each half's two summed as the current half maps."""
        self.subset_maps = [bp.finalize() for bp in bps]
        halves = [bps[0].add_(bps[1]), bps[2].add_(bps[3])]
        self.set_maps([bp.finalize() for bp in halves], halves)


def sub_half(gi: Tensor) -> Tensor:
    """Each particle's sub-half ``(n,)`` in {0, 1}: within each half set, particles are matched against the
    map of the *other* sub-half of their half, so that no particle is compared with a map that holds its
    own image (with hundreds of particles per class that self-match outweighs what tells the classes
    apart, and every particle stays in the class it was dealt; the halves stay independent). A hash of the
    index, not its parity: half sets are often dealt by parity."""
    return ((gi.long() * 2654435761) >> 16) & 1


def subsets(half: Tensor) -> Tensor:
    """``(N,)`` int64 in 1..4, each particle's half set and sub-half (:func:`sub_half`): half 1's sub-halves
    are 1 and 2, half 2's 3 and 4. A particle of half ``h`` and sub-half ``b`` is scored against the map of
    sub-half ``1 - b`` of the same half, entry ``2 (h - 1) + 1 - b`` of :attr:`RefineState.subset_maps`."""
    return 2 * (half.long() - 1) + 1 + sub_half(torch.arange(len(half)))


def prepared_reference(st: RefineState, volume: Tensor, band: FourierBand):
    """``volume`` masked, cropped to ``band`` and made ready for projection."""
    return prepare_volume(fourier_crop_volume(volume * st.mask, band.crop), pad=st.cfg.pad)


def on_every_rank(comm: Communicator | None, work: Callable[..., T], *args) -> T:
    """``work(*args)``; with several ranks, a failure on one stops them all here, not in a sum after it."""
    return comm.check(partial(work, *args)) if comm is not None and comm.distributed else work(*args)


def share(comm: Communicator, tensors: list[Tensor], dev: torch.device) -> None:
    """Sum ``tensors`` over the ranks in place, every rank getting the sum; call only when every rank is
    known to be here (right after a ``check``). Tensors off ``dev`` go through it: NCCL sums no CPU tensors."""
    staged = [t if t.device == dev else t.to(dev) for t in tensors]
    comm.reduce_sum_(staged, dst=None)
    for t, u in zip(tensors, staged):
        if u is not t:
            t.copy_(u)


def _as_tensor(x, dtype=torch.float64) -> Tensor:
    return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).detach().to("cpu", dtype)


def _checked_poses(ctf: CTFParams | None, rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray,
                   half_set: Tensor | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """The starting poses as float64 CPU tensors ``(N, 3, 3)``, ``(N, 2)`` and the half sets ``(N,)`` int64,
    after checking that they fit together."""
    R = _as_tensor(rotations)
    s = _as_tensor(shifts)
    half = _as_tensor(half_set, torch.int64)
    N = R.shape[0]
    if R.shape != (N, 3, 3) or s.shape != (N, 2) or half.shape != (N,):
        raise ValueError(f"refine_poses: rotations (N,3,3), shifts (N,2), half_set (N,) expected, got "
                         f"{tuple(R.shape)}, {tuple(s.shape)}, {tuple(half.shape)}")
    if N == 0:
        raise ValueError("refine_poses: no particles")
    if not bool(((half == 1) | (half == 2)).all()):
        raise ValueError("refine_poses: half_set values must be 1 or 2")
    if ctf is not None and len(ctf) != N:
        raise ValueError(f"refine_poses: {len(ctf)} CTF entries for {N} particles")
    return R, s, half


def _probe_box(load_images: Callable[[np.ndarray], Tensor], own: np.ndarray) -> int:
    """The box ``D`` of the images, from reading one (this rank's first, or particle 0 if it has none)."""
    return int(load_images(own[:1] if len(own) else np.zeros(1, dtype=np.int64)).shape[-1])


def start_state(load_images: Callable[[np.ndarray], Tensor], ctf: CTFParams | None, apix: float,
                rotations: Tensor | np.ndarray, shifts: Tensor | np.ndarray, half_set: Tensor | np.ndarray,
                cfg: RefineConfig, device: torch.device | str | None, progress: Progress | None,
                on_stage: OnStage | None, comm: Communicator | None) -> RefineState:
    """The state before the first pass: checked inputs (arguments as
    :func:`~cryofastar_core.refine.driver.refine_poses`), this rank's block of particles, the box (read
    from one image), the mask, and an empty power spectrum; no maps yet."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    R, s, half = _checked_poses(ctf, rotations, shifts, half_set)
    N = R.shape[0]
    use_ctf = ctf if (ctf is not None and cfg.use_ctf) else None
    if use_ctf is not None:
        use_ctf = use_ctf.to(dev)
    own = np.arange(N, dtype=np.int64)
    if comm is not None and comm.distributed:
        own = np.array_split(own, comm.world_size)[comm.rank]
    D = on_every_rank(comm, _probe_box, load_images, own)
    radius = cfg.mask_radius if cfg.mask_radius is not None else 0.45 * D - cfg.mask_width
    mask = soft_sphere_mask(D, radius, cfg.mask_width, device=dev)
    return RefineState(cfg=cfg, load_images=load_images, ctf=use_ctf, apix=apix, device=dev, comm=comm,
                       progress=progress, on_stage=on_stage, R=R.clone(), s=s.clone(), half=half, own=own, box=D,
                       mask=mask, spectrum=PowerSpectrum(D, dev), started=time.perf_counter())
