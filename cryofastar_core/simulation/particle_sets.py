"""Simulated particle sets: a synthetic particle set with known poses, in RELION 3.1 format.

Output folder ``DIR``:

* ``particles.star``: ``data_optics`` + ``data_particles`` with the ground-truth poses
  (``rlnAngleRot/Tilt/Psi``, ``rlnOriginXAngst/YAngst``), CTF columns and ``rlnRandomSubset``;
* ``particles.mrcs`` (or ``particles_000.mrcs``, ``particles_001.mrcs``, ... of at most
  ``--stack-size`` images and 1 GiB each: a stack is built in memory, then written);
* ``truth.mrc``: the map that was projected, at the output box and pixel size.

Image paths: ``rlnImageName`` is ``000001@particles.mrcs``, relative to ``DIR``. RELION resolves
image paths against its working directory (the project folder), so run RELION programs from
``DIR`` (``cd DIR && relion_reconstruct --i particles.star ...``); cryofastar's own readers also
look next to the STAR file, so they work from anywhere.

Everything is written into a hidden staging folder inside ``DIR`` and moved into place at the
end, ``particles.star`` last: a failed run leaves no file that looks finished.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.geometry import random_rotations
from cryofastar_core.io.atomic_write import staged_output_dir
from cryofastar_core.runtime.progress import Progress


log = logging.getLogger(__name__)


STAR_NAME = "particles.star"


TRUTH_NAME = "truth.mrc"


STACK_BYTES_MAX = 1 << 30  # one stack is built in memory before it is written: cap it at 1 GiB


@dataclass
class SimulateConfig:
    """Validated options of one simulation run (units: px, Å, kV, mm)."""

    out_dir: Path
    n: int
    box: int
    snr: float  # math.inf = no noise
    seed: int
    map_path: Path | None = None
    model_path: Path | None = None
    apix: float | None = None  # None: keep the map's field of view (map apix * map box / box)
    model_resolution: float | None = None
    ctf: bool = False
    max_shift: float = 0.0
    defocus_min: float = 5000.0
    defocus_max: float = 30000.0
    max_astigmatism: float = 500.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    chunk_size: int = 500
    stack_size: int = 10000
    device: str = "cpu"


def _validate(cfg: SimulateConfig) -> None:
    def bad(field: str, problem: str, fix: str):
        raise InputError(None, field, problem, fix)

    if cfg.n <= 0:
        bad("--n", f"number of particles must be positive (got {cfg.n})", "pass --n 1 or more")
    if cfg.box < 8:
        bad("--box", f"box must be at least 8 px (got {cfg.box})", "pass a larger --box")
    if not (cfg.snr > 0):  # also catches NaN
        bad("--snr", f"SNR must be positive (got {cfg.snr})", "pass e.g. --snr 0.1, or --snr inf for no noise")
    if cfg.apix is not None and not (cfg.apix > 0 and math.isfinite(cfg.apix)):
        bad("--apix", f"pixel size must be positive (got {cfg.apix})", "pass the pixel size in Å/px")
    if cfg.max_shift < 0 or not math.isfinite(cfg.max_shift):
        bad("--max-shift", f"must be >= 0 px (got {cfg.max_shift})", "pass a shift range in pixels, e.g. 3")
    if not (0 < cfg.defocus_min <= cfg.defocus_max):
        bad("--defocus-range", f"need 0 < MIN <= MAX (got {cfg.defocus_min}, {cfg.defocus_max})",
            "pass e.g. --defocus-range 5000 30000 (Å)")
    if cfg.chunk_size <= 0 or cfg.stack_size <= 0:
        bad("--chunk-size/--stack-size", "must be positive", "pass positive integers")
    if cfg.model_path is not None and cfg.apix is None:
        bad("--apix", "an atomic model has no pixel size", "pass --apix (Å/px) with --model")
    if cfg.map_path is not None and not Path(cfg.map_path).is_file():
        raise InputError(cfg.map_path, None, "map file not found", "check the --map path")
    if cfg.model_path is not None and not Path(cfg.model_path).is_file():
        raise InputError(cfg.model_path, None, "model file not found", "check the --model path")


def resample_map(vol: np.ndarray, apix_in: float, box: int, apix: float) -> tuple[np.ndarray, float]:
    """Bring a cubic map ``(n, n, n)`` at ``apix_in`` to ``(box, box, box)`` at (about) ``apix``.

    First Fourier-crop/pad to ``m = round(n * apix_in / apix)`` voxels (new voxel size ``n * apix_in / m``),
    then crop or zero-pad in real space around the centre to ``box``. Returns ``(volume, apix_out)``;
    ``apix_out`` differs from ``apix`` only by the rounding of ``m`` (logged when it does).
    """
    from cryofastar_core.physics.fourier import fourier_crop_volume, fourier_pad_volume, pad_centred

    n = vol.shape[-1]
    m = max(1, int(round(n * apix_in / apix)))
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)).double()
    if m < n:
        t = fourier_crop_volume(t, m)
    elif m > n:
        t = fourier_pad_volume(t, m)
    apix_out = n * apix_in / m
    if abs(apix_out - apix) > 1e-4 * apix:
        log.warning("pixel size %.5f Å/px rounded to %.5f Å/px (map of %d voxels resampled to %d)",
                    apix, apix_out, n, m)
    t = pad_centred(t, box, 3)
    return t.float().numpy(), apix_out


def load_truth(cfg: SimulateConfig) -> tuple[np.ndarray, float]:
    """The map to project at the output box: ``(V (box, box, box) float32, apix)``."""
    if cfg.map_path is not None:
        from cryofastar_core.io import read_map

        vol, apix_in = read_map(cfg.map_path)
        n = vol.shape[-1]
        apix = cfg.apix if cfg.apix is not None else apix_in * n / cfg.box
        if n == cfg.box and abs(apix - apix_in) <= 1e-6 * apix_in:
            return vol.astype(np.float32, copy=False), apix_in
        return resample_map(vol, apix_in, cfg.box, apix)
    from cryofastar_core.physics.atomic import atomic_model_to_map

    vol = atomic_model_to_map(cfg.model_path, cfg.apix, cfg.box, resolution=cfg.model_resolution)
    vol = vol.detach().cpu().numpy() if torch.is_tensor(vol) else np.asarray(vol)
    return vol.astype(np.float32, copy=False), float(cfg.apix)


def draw_ctf(n: int, cfg: SimulateConfig, generator: torch.Generator) -> dict[str, np.ndarray]:
    """Random per-particle CTF values in RELION units: mean defocus uniform in the range, astigmatism
    ``U - V`` uniform in ``[0, max_astigmatism]`` Å, angle uniform in [0, 180)°."""
    u = torch.rand(3, n, generator=generator, dtype=torch.float64).numpy()
    mean = cfg.defocus_min + (cfg.defocus_max - cfg.defocus_min) * u[0]
    astig = cfg.max_astigmatism * u[1]
    return {
        "defocus_u": mean + astig / 2, "defocus_v": mean - astig / 2, "defocus_angle": 180.0 * u[2],
        "voltage": np.full(n, cfg.voltage), "cs": np.full(n, cfg.cs),
        "amplitude_contrast": np.full(n, cfg.amplitude_contrast), "phase_shift": np.zeros(n),
        "bfactor": np.zeros(n), "scale": np.ones(n),
    }


def stack_names(n: int, stack_size: int) -> list[str]:
    """``particles.mrcs`` for one stack, else ``particles_000.mrcs``, ``particles_001.mrcs``, ..."""
    n_stacks = -(-n // stack_size)
    if n_stacks == 1:
        return ["particles.mrcs"]
    width = max(3, len(str(n_stacks - 1)))
    return [f"particles_{i:0{width}d}.mrcs" for i in range(n_stacks)]


def simulate(cfg: SimulateConfig, progress: Progress | None = None) -> Path:
    """Run the simulation; returns the path of the written ``particles.star``. ``progress("simulate", done,
    n)`` is called after each chunk of images (:mod:`cryofastar_core.runtime.progress`)."""
    from cryofastar_core.io import new_star, write_map, write_stack
    from cryofastar_core.physics.ctf import CTFParams
    from cryofastar_core.physics.projection import prepare_volume
    from cryofastar_core.reconstruct import random_half_sets
    from cryofastar_core.simulation.images import simulate_images

    _validate(cfg)
    out_dir = Path(cfg.out_dir)
    truth, apix = load_truth(cfg)
    if not np.isfinite(truth).all() or not np.any(truth):
        raise InputError(cfg.map_path or cfg.model_path, "data", "the map is empty or not finite after resampling",
                         "check the map, --box and --apix")

    gen = torch.Generator().manual_seed(int(cfg.seed))
    n = cfg.n
    # Poses, origins, CTF and half sets are drawn up front (small: O(N)); images chunk by chunk.
    rotations = random_rotations(n, generator=gen, dtype=torch.float64)
    shifts = (2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1) * cfg.max_shift
    ctf_values = draw_ctf(n, cfg, gen)
    half = random_half_sets(n, gen)  # values 1/2, as rlnRandomSubset

    device = torch.device(cfg.device)
    vft = prepare_volume(torch.from_numpy(truth).to(device), pad=2)
    ctf_all = CTFParams.from_arrays(ctf_values, dtype=torch.float32) if cfg.ctf else None
    snr = None if math.isinf(cfg.snr) else cfg.snr

    stack_size = max(1, min(cfg.stack_size, STACK_BYTES_MAX // (4 * cfg.box * cfg.box)))
    names = stack_names(n, stack_size)
    with staged_output_dir(out_dir, last=[STAR_NAME]) as staging:
        image_names: list[str] = []
        for s, name in enumerate(names):
            start, stop = s * stack_size, min(n, (s + 1) * stack_size)
            stack = np.empty((stop - start, cfg.box, cfg.box), np.float32)
            for c0 in range(start, stop, cfg.chunk_size):
                c1 = min(stop, c0 + cfg.chunk_size)
                ctf = ctf_all.index(slice(c0, c1)) if ctf_all is not None else None
                clean, noisy = simulate_images(vft, rotations[c0:c1].float(), shifts[c0:c1].float(), ctf, apix,
                                               snr, gen)
                stack[c0 - start:c1 - start] = noisy.cpu().numpy()
                del clean, noisy
                if progress:
                    progress("simulate", c1, n)
            write_stack(staging / name, stack, apix)
            del stack
            image_names += [f"{i + 1:06d}@{name}" for i in range(stop - start)]
        write_map(staging / TRUTH_NAME, truth, apix)
        new_star(staging / STAR_NAME, image_names, apix, cfg.box, cfg.voltage, cfg.cs, cfg.amplitude_contrast,
                 ctf_values if cfg.ctf else None, rotations, shifts,
                 extra_columns={"rlnRandomSubset": half})
    log.info("simulated %d particles (box %d, %.4f Å/px, SNR %s, CTF %s) in %s", n, cfg.box, apix,
             "inf" if snr is None else f"{snr:g}", "on" if cfg.ctf else "off", out_dir)
    return out_dir / STAR_NAME
