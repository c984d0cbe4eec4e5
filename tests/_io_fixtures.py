"""Small on-disk particle data sets for the io tests (written by hand, not by the code under test)."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np


def make_stack(path: Path, n: int, box: int = 16, dtype=np.float32, seed: int = 0, apix: float = 1.5) -> np.ndarray:
    """Write an MRC stack of ``n`` random ``box``² images; return the data."""
    rng = np.random.default_rng(seed)
    data = (rng.normal(size=(n, box, box)) * 100).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = apix
    return data


def random_eulers(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-180, 180, n), rng.uniform(5, 175, n), rng.uniform(-180, 180, n)], -1)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def relion31_project(root: Path, n_per_group: int = 4, box: int = 16) -> tuple[Path, dict]:
    """A RELION 3.1 project: two optics groups (different pixel size and voltage), two stacks, poses, CTF.

    Returns the STAR path and the values written into it.
    """
    stacks = {"Extract/job002/a.mrcs": make_stack(root / "Extract/job002/a.mrcs", n_per_group, box, seed=1),
              "Extract/job002/b.mrcs": make_stack(root / "Extract/job002/b.mrcs", n_per_group, box, seed=2)}
    n = 2 * n_per_group
    eul = random_eulers(n, seed=3)
    origin = np.random.default_rng(4).normal(0, 3, (n, 2)).round(4)
    group = np.repeat([1, 2], n_per_group)
    apix_of = {1: 1.5, 2: 2.0}
    lines = ["", "# version 30001", "", "data_optics", "", "loop_",
             "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2", "_rlnAmplitudeContrast #3", "_rlnSphericalAberration #4",
             "_rlnVoltage #5", "_rlnImagePixelSize #6", "_rlnImageSize #7", "_rlnImageDimensionality #8",
             f"1 opticsGroup1 0.1 2.7 300.0 1.5 {box} 2", f"2 opticsGroup2 0.07 2.7 200.0 2.0 {box} 2", "",
             "", "# version 30001", "", "data_particles", "", "loop_"]
    cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU",
            "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift", "rlnAngleRot",
            "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber", "rlnGroupNumber"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    defu = 10000 + 500 * np.arange(n)
    for i in range(n):
        stack = "Extract/job002/a.mrcs" if i < n_per_group else "Extract/job002/b.mrcs"
        lines.append(f"{100 + i}.0 {200 + i}.0 {i % n_per_group + 1:06d}@{stack} MotionCorr/job001/mic{i // 3}.mrc "
                     f"{group[i]} {defu[i]:.6f} {defu[i] - 300:.6f} {10.0 + i:.6f} {5.0 * i:.6f} {1.0 - 0.01 * i:.6f} "
                     f"0.000000 {eul[i, 0]:.6f} {eul[i, 1]:.6f} {eul[i, 2]:.6f} {origin[i, 0]:.6f} {origin[i, 1]:.6f} 1 {i % 3 + 1}")
    star = write_text(root / "Select/job003/particles.star", "\n".join(lines) + "\n")
    apix = np.array([apix_of[g] for g in group])
    return star, {"stacks": stacks, "eulers": eul, "origin_angst": origin, "group": group, "apix": apix,
                  "defocus_u": defu, "n_per_group": n_per_group, "columns": cols}


def relion30_star(root: Path, n: int = 5, box: int = 16, pixel_columns: str = "mag") -> tuple[Path, dict]:
    """A RELION 3.0 single-table STAR with pixel origins; pixel size from mag/detector or rlnImagePixelSize."""
    data = make_stack(root / "Particles/stack.mrcs", n, box, seed=7)
    eul = random_eulers(n, seed=8)
    origin_px = np.random.default_rng(9).normal(0, 2, (n, 2)).round(4)
    cols = ["rlnImageName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnDefocusU",
            "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY"]
    cols += ["rlnMagnification", "rlnDetectorPixelSize"] if pixel_columns == "mag" else ["rlnImagePixelSize"]
    lines = ["", "data_", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for i in range(n):
        px = "10000.0 2.5" if pixel_columns == "mag" else "2.5"
        lines.append(f"{i + 1:06d}@Particles/stack.mrcs 300.0 2.7 0.1 {12000 + i}.0 {11800 + i}.0 30.0 "
                     f"{eul[i, 0]:.6f} {eul[i, 1]:.6f} {eul[i, 2]:.6f} {origin_px[i, 0]:.6f} {origin_px[i, 1]:.6f} {px}")
    star = write_text(root / "particles30.star", "\n".join(lines) + "\n")
    return star, {"data": data, "eulers": eul, "origin_px": origin_px, "apix": 2.5, "columns": cols}
