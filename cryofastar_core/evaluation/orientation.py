"""How evenly a pose set samples Fourier space: the sampling compensation factor (SCF).

A map from a preferred orientation is not wrong, it is anisotropic: directions in Fourier space that few
central sections pass through are measured from fewer particles. Baldwin & Lyumkis (Prog. Biophys. Mol.
Biol. 150, 160-183, 2020) summarise this in one number. By the projection-slice theorem the image with
projection direction ``n`` fills the central section ``{k : k . n = 0}``; on a Fourier shell of radius
``r`` (in pixels of the box) the section is a great circle about one voxel thick, so the sampling at the
unit direction ``u`` is

    ``S(u) = sum_i K(u . n_i)``,  ``K(x) = max(0, 1 - |x| r)``  (a one-voxel-wide band around each circle),

and the SCF is the harmonic mean of ``S`` over the shell divided by its arithmetic mean,
``SCF = 1 / (<S> <1/S>)``. The noise of a Wiener-weighted reconstruction in each direction goes as
``1 / S``, so the SCF is the fraction of the particles that a uniform set would need for the same mean
noise: 1 for uniform sampling, lower for a preferred orientation, 0 when a cone of directions is never
sampled (a missing cone: ``S = 0`` somewhere). A finite set is never exactly uniform: each shell
direction collects about ``N / (2 r)`` of ``N`` particles, with Poisson-like scatter, so a uniform set
reads about ``1 - 4 r / (3 N)``; the shell is therefore chosen no finer than ``N / 100`` (a uniform set
then reads above 0.98; tests/test_orientation.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

# Below this the sampling is reported as anisotropic. A uniform set reads above 0.98, and half the particles
# within 25 degrees of one axis already reads far lower (tests/test_orientation.py holds both).
ANISOTROPIC_SCF = 0.8


@dataclass
class OrientationReport:
    """The orientation diagnostic of a pose set (``report.json`` -> ``quality`` -> ``orientation``).

    ``scf``: sampling compensation factor (module docstring); ``shell_px``: the Fourier shell it was
    measured on; ``worst_direction``: the unit Fourier direction ``(x, y, z)`` (map frame) that is
    sampled least; ``sampling_ratio``: its sampling over the shell's mean; ``anisotropic``: ``scf`` below
    :data:`ANISOTROPIC_SCF`."""

    scf: float
    shell_px: float
    worst_direction: list[float]
    sampling_ratio: float
    anisotropic: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sentence(self) -> str:
        """One plain line for the log and the verdict."""
        what = ("anisotropic: some directions of the map are resolved from far fewer particles than others"
                if self.anisotropic else "even enough for an isotropic map")
        return (f"orientation sampling (SCF, Baldwin & Lyumkis) {self.scf:.2f} (1 = uniform): {what}; least "
                f"sampled Fourier direction at {self.sampling_ratio:.0%} of the mean")


def shell_directions(n: int = 2000) -> Tensor:
    """``n`` near-uniform unit vectors ``(n, 3)`` float64 on the sphere (a Fibonacci lattice)."""
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (1 + math.sqrt(5)) * k
    rho = torch.sqrt(1 - z * z)
    return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], -1)


def fourier_sampling(rotations: Tensor | np.ndarray, shell_px: float, directions: Tensor,
                     batch: int = 4096) -> Tensor:
    """``S(u)`` ``(M,)`` float64 at the unit ``directions`` ``(M, 3)``: how many central sections of the
    poses ``rotations`` ``(N, 3, 3)`` (internal convention: the projection direction is ``R @ z``) pass
    within one voxel of ``u`` on the shell of radius ``shell_px``."""
    R = torch.as_tensor(np.asarray(rotations), dtype=torch.float64).reshape(-1, 3, 3)
    normals = R[:, :, 2]
    S = torch.zeros(directions.shape[0], dtype=torch.float64)
    for a in range(0, normals.shape[0], batch):
        dots = directions @ normals[a:a + batch].T                                   # (M, b)
        S += (1 - dots.abs() * shell_px).clamp_min(0).sum(-1)
    return S


def orientation_report(rotations: Tensor | np.ndarray, box: int, shell_px: float | None = None,
                       n_directions: int = 2000) -> OrientationReport:
    """The SCF of ``rotations`` ``(N, 3, 3)`` on the shell ``shell_px``: by default ``box / 4`` (where ab
    initio maps carry their signal), but no finer than ``N / 100`` so that the count's own scatter does not
    read as anisotropy (module docstring)."""
    R = torch.as_tensor(np.asarray(rotations), dtype=torch.float64).reshape(-1, 3, 3)
    shell = float(shell_px if shell_px is not None else max(1.0, min(box / 4, R.shape[0] / 100)))
    u = shell_directions(n_directions)
    S = fourier_sampling(R, shell, u)
    mean = float(S.mean())
    if mean <= 0 or float(S.min()) <= 0:
        scf = 0.0
    else:
        scf = float(1.0 / (mean * float((1.0 / S).mean())))
    worst = int(S.argmin())
    return OrientationReport(scf=scf, shell_px=shell, worst_direction=[round(float(v), 4) for v in u[worst]],
                             sampling_ratio=float(S[worst]) / mean if mean > 0 else 0.0,
                             anisotropic=scf < ANISOTROPIC_SCF)
