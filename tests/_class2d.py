"""A small particle set with a real RELION 3.1 Class2D run on it, for the class-average route's tests.

Particles are projections of the demo map (Fourier-cropped to ``box``) from ``n_views`` viewing
directions, each seen at random in-plane angles and shifts, so Class2D can put each direction in a
class of its own; the truth is written beside (``truth.star``), the input without poses
(``particles.star``), and Class2D runs in ``Class2D/`` of the same folder (the RELION project folder).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from cryofastar_core.geometry import random_rotations, relion_euler_to_matrix
from cryofastar_core.io import new_star, read_map, write_stack
from cryofastar_core.physics.fourier import fourier_crop_volume
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.simulation.images import simulate_images

DEMO_MAP = Path(__file__).resolve().parents[1] / "cryofastar_core" / "data" / "demo_3enl_box64.mrc"


def discrete_view_particles(root: Path, n_views: int = 10, per_view: int = 16, box: int = 32, snr: float = 3.0,
                            max_shift: float = 2.0, seed: int = 0) -> tuple[Path, Path]:
    """``(particles.star without poses, truth.star)`` in ``root``."""
    gen = torch.Generator().manual_seed(seed)
    vol, apix0 = read_map(DEMO_MAP)
    vol = fourier_crop_volume(torch.from_numpy(vol).float(), box)
    apix = apix0 * vol.new_tensor(64 / box).item()
    views = random_rotations(n_views, generator=gen, dtype=torch.float64)
    psi = torch.rand(n_views * per_view, generator=gen, dtype=torch.float64) * 360
    in_plane = relion_euler_to_matrix(torch.zeros_like(psi), torch.zeros_like(psi), psi)
    rotations = views.repeat_interleave(per_view, 0) @ in_plane
    shifts = (2 * torch.rand(len(psi), 2, generator=gen, dtype=torch.float64) - 1) * max_shift
    _, noisy = simulate_images(prepare_volume(vol), rotations.float(), shifts.float(), None, apix, snr, gen)
    root.mkdir(parents=True, exist_ok=True)
    write_stack(root / "particles.mrcs", noisy.numpy().astype(np.float32), apix)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(len(psi))]
    new_star(root / "truth.star", names, apix, box, 300.0, 2.7, 0.1, None, rotations.numpy(), shifts.numpy())
    new_star(root / "particles.star", names, apix, box, 300.0, 2.7, 0.1, None, None, None)
    return root / "particles.star", root / "truth.star"


def run_class2d(project: Path, classes: int, iterations: int, diameter_angst: float, threads: int = 2) -> Path:
    """RELION 3.1 ``relion_refine`` 2D classification of ``project/particles.star``; the last ``_data.star``."""
    out = project / "Class2D"
    out.mkdir(exist_ok=True)
    cmd = ["relion_refine", "--i", "particles.star", "--o", "Class2D/run", "--K", str(classes), "--iter", str(iterations),
           "--tau2_fudge", "2", "--particle_diameter", str(diameter_angst), "--zero_mask", "--flatten_solvent",
           "--oversampling", "1", "--psi_step", "10", "--offset_range", "4", "--offset_step", "1", "--norm", "--scale",
           "--j", str(threads), "--pool", "30", "--pad", "2", "--dont_combine_weights_via_disc",
           "--strict_highres_exp", "12", "--random_seed", "1"]
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=900)
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"relion_refine Class2D failed ({done.returncode}): {done.stderr[-2000:]}")
    return out / f"run_it{iterations:03d}_data.star"
