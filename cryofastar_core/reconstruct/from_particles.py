"""Reconstruction job: half maps, full map and gold-standard FSC from particles with poses.

Reads a RELION ``.star`` (3.0 or 3.1+) or CryoSPARC ``.cs`` particle file that carries poses, and
back-projects the images (CTF-corrected by Wiener-like division unless ``--no-ctf``) into two
half maps: by ``rlnRandomSubset`` (or ``alignments3D/split``) when present, else a random split
with a fixed seed. Particles are streamed in chunks, so memory does not grow with their number.

Outputs in ``DIR`` (written into a staging folder and moved into place together, ``map.mrc`` last):
``half1.mrc``, ``half2.mrc``, ``map.mrc`` (all particles), ``fsc.tsv`` (shell, frequency in 1/Å,
resolution in Å, FSC between the half maps) and ``fsc.png``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofastar_core.evaluation.plots import fsc_plot
from cryofastar_core.io import read_particles, write_map
from cryofastar_core.io.atomic_write import staged_output_dir
from cryofastar_core.io.particle_set import ParticleSet
from cryofastar_core.reconstruct.backproject import ParticleChunk, reconstruct_half_maps
from cryofastar_core.reconstruct.fsc import fsc, fsc_tsv, resolution_at
from cryofastar_core.reconstruct.half_sets import half_sets
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.threads import set_thread_count

log = logging.getLogger(__name__)


@dataclass
class ReconstructConfig:
    """Validated options of one reconstruction run."""

    particles: Path
    out_dir: Path
    project_dir: Path | None = None
    ctf: bool = True
    threads: int | None = None
    chunk_size: int = 256
    device: str = "cpu"
    pad: int = 2


@dataclass
class ReconstructResult:
    """What ``reconstruct`` wrote and measured."""

    out_dir: Path
    freq: np.ndarray  # (S,) cycles/px
    fsc: np.ndarray  # (S,) half-map FSC
    apix: float
    resolution_0143: float
    n_particles: int
    seconds: float


def reconstruct_particles(cfg: ReconstructConfig) -> ReconstructResult:
    """Run the reconstruction described by ``cfg`` and write its outputs; see the module docstring."""
    t0 = time.perf_counter()
    _apply_run_options(cfg)
    ps = _read_posed_particles(cfg)
    n = len(ps)
    apix = _common_pixel_size(cfg, ps)
    use_ctf = _use_ctf(cfg, ps)
    half = half_sets(ps.half_set, n, str(cfg.particles))
    full, half1, half2 = _back_project(cfg, ps, half, use_ctf, apix)
    freq_t, fsc_t = fsc(half1, half2)
    res = resolution_at(freq_t, fsc_t, apix, 0.143)
    freq, curve = freq_t.cpu().numpy(), fsc_t.cpu().numpy()
    _write_outputs(cfg.out_dir, full, half1, half2, freq, curve, apix, res, n)
    seconds = time.perf_counter() - t0
    log.info("reconstructed %d particles (box %d, %.4f Å/px) in %.1f s; FSC 0.143: %.2f Å", n, ps.box, apix,
             seconds, res)
    return ReconstructResult(cfg.out_dir, freq, curve, apix, res, n, seconds)


def _apply_run_options(cfg: ReconstructConfig) -> None:
    """Check ``--threads`` (and set torch's thread count from it) and ``--chunk-size``."""
    if cfg.threads is not None and cfg.threads <= 0:
        raise InputError(None, "--threads", f"must be positive (got {cfg.threads})", "pass --threads 1 or more")
    set_thread_count(cfg.threads)
    if cfg.chunk_size <= 0:
        raise InputError(None, "--chunk-size", f"must be positive (got {cfg.chunk_size})", "pass a positive integer")


def _read_posed_particles(cfg: ReconstructConfig) -> ParticleSet:
    """The particles of ``cfg.particles``: at least two, with poses."""
    ps = read_particles(cfg.particles, cfg.project_dir)
    n = len(ps)
    if n < 2:
        raise InputError(cfg.particles, None, f"{n} particle(s): two half sets need at least 2",
                         "give a particle file with more particles")
    if ps.rotations is None:
        raise InputError(cfg.particles, "rlnAngleRot/rlnAngleTilt/rlnAnglePsi (alignments3D/pose)",
                         "the particles have no poses", "give a particle file from a refinement or from cryofastar")
    return ps


def _common_pixel_size(cfg: ReconstructConfig, ps: ParticleSet) -> float:
    """The particles' one pixel size (Å/px); InputError when they differ (relative tolerance 1e-4)."""
    apix_all = np.asarray(ps.apix, dtype=np.float64)
    apix = float(apix_all[0])
    if not np.allclose(apix_all, apix, rtol=1e-4):
        raise InputError(cfg.particles, "rlnImagePixelSize",
                         f"particles have different pixel sizes ({apix_all.min():.4f}-{apix_all.max():.4f} Å)",
                         "reconstruct one optics group at a time, or rescale the particles to one pixel size")
    return apix


def _use_ctf(cfg: ReconstructConfig, ps: ParticleSet) -> bool:
    """Whether to correct for the CTF: as asked, unless the particles have no CTF parameters (a warning)."""
    use_ctf = cfg.ctf
    if use_ctf and ps.ctf is None:
        log.warning("%s has no CTF parameters: reconstructing without CTF correction", cfg.particles)
        use_ctf = False
    return use_ctf


def _back_project(cfg: ReconstructConfig, ps: ParticleSet, half: np.ndarray, use_ctf: bool,
                  apix: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full map and the two half maps from the particles, streamed in chunks; closes ``ps``."""
    n = len(ps)
    rotations = torch.as_tensor(np.asarray(ps.rotations), dtype=torch.float32)
    shifts = torch.zeros(n, 2) if ps.shifts is None else torch.as_tensor(np.asarray(ps.shifts), dtype=torch.float32)
    chunks = _particle_chunks(ps, cfg.chunk_size, rotations, half, shifts, use_ctf, apix)
    try:
        return reconstruct_half_maps(chunks, box=ps.box, pad=cfg.pad, device=torch.device(cfg.device))
    finally:
        ps.close()


def _particle_chunks(ps: ParticleSet, chunk_size: int, rotations: torch.Tensor, half: np.ndarray,
                     shifts: torch.Tensor, use_ctf: bool, apix: float) -> Iterator[ParticleChunk]:
    """``ParticleChunk``\\ s of ``chunk_size`` particles: sign-applied images with their poses, half sets and CTF."""
    for start in range(0, len(ps), chunk_size):
        idx = np.arange(start, min(start + chunk_size, len(ps)))
        yield ParticleChunk(images=torch.from_numpy(ps.read_signed_images(idx)), rotations=rotations[idx],
                            half_sets=half[idx], shifts=shifts[idx],
                            ctf=ps.ctf_params(idx) if use_ctf else None, apix=apix)


def _write_outputs(out_dir: Path, full: torch.Tensor, half1: torch.Tensor, half2: torch.Tensor, freq: np.ndarray,
                   curve: np.ndarray, apix: float, res: float, n: int) -> None:
    """Write the half maps, ``fsc.tsv``, ``fsc.png`` and ``map.mrc`` into ``out_dir``: all five files appear
    together (staged, then renamed), or none does."""
    with staged_output_dir(out_dir, last=["map.mrc"]) as stage:
        write_map(stage / "half1.mrc", half1.cpu().numpy(), apix)
        write_map(stage / "half2.mrc", half2.cpu().numpy(), apix)
        (stage / "fsc.tsv").write_text(fsc_tsv(freq, curve, apix))
        fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png",
                 title=f"gold-standard FSC: {res:.2f} Å at 0.143 ({n} particles)")
        write_map(stage / "map.mrc", full.cpu().numpy(), apix)
