"""The maps of posed particles: chunks read from disk, half-set accumulators shared over the ranks, and
the finished ``(full, half1, half2)`` maps with their FSC."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cryofastar_core.io import ParticleSet
from cryofastar_core.job.work_scale import cropped_loader
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.reconstruct import Backprojector, ParticleChunk, fsc, insert_half_sets, resolution_at
from cryofastar_core.reconstruct.centring import centring_offset
from cryofastar_core.refine.map_registration import shifts_after_moving_map
from cryofastar_core.runtime.communicator import Communicator
from cryofastar_core.runtime.progress import Progress


def fsc_resolution(half1: torch.Tensor, half2: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    # Not logged here: whether this number may be called a resolution waits for the pose-quality verdict.
    freq, curve = fsc(half1, half2)
    return freq, curve, resolution_at(freq, curve, apix, 0.143)


def with_fsc(maps: tuple, apix: float) -> tuple:
    """``(full, half1, half2, freq, curve, resolution)`` from ``(full, half1, half2)``."""
    full, half1, half2 = maps
    return (full, half1, half2, *fsc_resolution(half1, half2, apix))


CENTRED_WITHIN_PX = 0.01  # an offset this small is left alone (the maps are not moved for nothing)


def centring_at_input_box(full: torch.Tensor) -> torch.Tensor | None:
    """The offset ``(3,)`` px (float64, CPU) that moves the final map's centre of mass to the box centre, or
    None within :data:`CENTRED_WITHIN_PX` of it.

    Refinement centres its frame at the box it works at (``refine/origin.py``); at a quarter of the input
    box a tenth of a pixel there is most of a pixel here, so the job measures again on the input-box map
    (tests/test_work_scale.py)."""
    t = centring_offset(full).cpu()
    return t if float(t.norm()) > CENTRED_WITHIN_PX else None


def moved_maps(maps: tuple, t: torch.Tensor) -> tuple:
    """``(full, half1, half2)`` moved by ``t`` px (:func:`~cryofastar_core.physics.shift.shift_volume`):
    the maps of the shifts :func:`moved_shifts` gives, up to interpolation."""
    return tuple(shift_volume(m, t) for m in maps)


def moved_shifts(rotations: np.ndarray, shifts: np.ndarray, t: torch.Tensor) -> np.ndarray:
    """Shifts ``(N, 2)`` px of particles at ``rotations`` ``(N, 3, 3)`` after their map moved by ``t``."""
    moved = shifts_after_moving_map(torch.as_tensor(rotations, dtype=torch.float64),
                                    torch.as_tensor(shifts, dtype=torch.float64), t)
    return moved.numpy().astype(shifts.dtype, copy=False)


def accumulate_shard(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                      keep: np.ndarray, apix: float, device: torch.device, read_chunk: int,
                      progress: Progress | None, comm: Communicator) -> list[Backprojector]:
    """Insert this rank's contiguous share of the kept particles into two half-set Backprojectors, then sum
    the accumulators of every rank into rank 0's (the others' hold nothing useful afterwards). One process:
    every kept particle, nothing to sum."""
    indices = np.flatnonzero(keep)
    mine = np.array_split(indices, comm.world_size)[comm.rank]
    my_keep = np.zeros_like(keep)
    my_keep[mine] = True
    halves = [Backprojector(particles.box, device=device) for _ in range(2)]
    total = len(indices)
    done = [0]

    def tick(k: int) -> None:
        # This rank's share times the number of ranks: an estimate of the whole.
        k_all = min(k * comm.world_size, total - done[0])
        done[0] += k_all
        if progress:
            progress("reconstruct", done[0], total)

    def insert_mine() -> None:
        for ch in particle_chunks(particles, rotations, shifts, half, my_keep, apix, device, read_chunk, tick):
            insert_half_sets(halves, ch.images, ch.rotations, ch.half_sets, shifts=ch.shifts, ctf=ch.ctf, apix=ch.apix)

    comm.check(insert_mine)
    comm.reduce_sum_([t for bp in halves for t in (bp.numerator, bp.weight)], dst=0)
    return halves


def finalize_halves(halves: list[Backprojector]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(full, half1, half2)`` from summed half-set accumulators. Empties ``halves``: each accumulator is
    let go as soon as it is used (at box 256 a pair holds 1.7 GB, and the FSC comes next)."""
    half1, half2 = halves[0].finalize(), halves[1].finalize()
    first, second = halves
    halves.clear()
    first.add_(second)
    del second
    return first.finalize(), half1, half2


def particle_chunks(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                    keep: np.ndarray, apix: float, device: torch.device, read_chunk: int,
                    on_chunk: Callable[[int], None] | None = None):
    ctf_all = particles.ctf_params() if particles.ctf is not None else None
    indices = np.flatnonzero(keep)
    load = cropped_loader(particles, indices, particles.box, device)  # the input box: sign applied, no crop
    for start in range(0, len(indices), read_chunk):
        local = np.arange(start, min(start + read_chunk, len(indices)))
        idx = indices[local]
        yield ParticleChunk(images=load(local), rotations=torch.as_tensor(rotations[idx], dtype=torch.float32, device=device),
                            half_sets=half[idx], shifts=torch.as_tensor(shifts[idx], dtype=torch.float32, device=device),
                            ctf=None if ctf_all is None else ctf_all.index(torch.as_tensor(idx)).to(device), apix=apix)
        if on_chunk:
            on_chunk(len(idx))


def reconstruct_maps(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                     keep: np.ndarray, apix: float, device: torch.device, read_chunk: int = 512,
                     progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The job's CTF-corrected ``(full, half1, half2)`` maps of the ``keep`` particles at the given poses: the
    job's reconstruct stage in one process."""
    return finalize_halves(accumulate_shard(particles, rotations, shifts, half, keep, apix, device, read_chunk,
                                            progress, Communicator()))

