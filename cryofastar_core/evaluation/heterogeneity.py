"""Does a one-class run's particle set hold two populations? A split of the particles into two classes,
tested for whether the two halves of the data reproduce it.

A two-class classification always splits a set, even a homogeneous one: by noise, by how well each
particle's pose fits. What only a real second population gives is a split that *both* gold-standard half
sets reproduce. With class maps ``A`` and ``B`` of each half set (``A1, A2, B1, B2``), per Fourier shell

    rho = mean(FSC(A1, B2), FSC(A2, B1)) / sqrt(FSC(A1, A2) * FSC(B1, B2)).

For maps ``S_X + n`` of one structure with independent noise, the cross-class FSC is the geometric mean of
the within-class ones, whatever each class's signal-to-noise ratio, and a class whose poses are worse (a
blurred, attenuated signal, the same per shell) changes nothing: ``rho = 1``. Two structures give
``rho < 1`` on the shells where both are measured. :func:`split_reproducibility` computes it over the shells
where both within-class FSCs exceed :data:`SIGNAL_FSC` (the noise of ``rho`` grows as they fall).

Measured (2,000 particles at box 64 classified from a finished one-class run's poses by the job's
:func:`~cryofastar_core.job.judge.split_test`, ``bench/results/2026-12-06-classes.md``, session 16): clean
sets ``1 - mean rho`` ≤ 0.0002 (1AKE, 6FLR, 3HSY, 7PBL); two conformations of adenylate kinase 50:50,
0.036–0.039, where the pose figures read ``ok``; one-class runs with a third junk, half of it another
protein (a fifth of the kept particles), 0.0058–0.0112 (session 18). Two proteins 50:50 whose consensus poses are far off
(the verdict already ``doubtful``) need the full pose search to separate (0.28 after 20 passes on the
15-degree grid, 0.006 or less on the coarse grid the job uses).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from cryofastar_core.reconstruct import fsc

SIGNAL_FSC = 0.3  # shells where both classes' half maps agree at least this well
MIN_SHELLS = 3  # fewer measured shells: no judgement
# 1 - mean rho: 25 times the clean sets' largest (above), below every one-class run with a third junk of which
# half another protein (0.0058-0.0112 on three draws), above one with a tenth another protein (0.0013)
# (bench/results/2026-12-06-classes.md, sessions 17-18); at 0.01 two of those three draws read ok.
HETEROGENEOUS_ABOVE = 0.005


@dataclass
class SplitTest:
    """``figure`` = 1 − mean ``rho`` over ``shells`` measured shells (NaN when fewer than
    :data:`MIN_SHELLS`); ``rho_min`` its smallest; ``sizes``: the two classes' particles."""

    figure: float
    rho_min: float
    shells: int
    sizes: list[int]

    @property
    def heterogeneous(self) -> bool:
        return bool(np.isfinite(self.figure) and self.figure > HETEROGENEOUS_ABOVE)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(heterogeneous=self.heterogeneous, threshold=HETEROGENEOUS_ABOVE,
                   figure=None if not np.isfinite(self.figure) else round(self.figure, 4),
                   rho_min=None if not np.isfinite(self.rho_min) else round(self.rho_min, 4))
        return out


def split_reproducibility(class_a: tuple[Tensor, Tensor], class_b: tuple[Tensor, Tensor], mask: Tensor,
                          sizes: list[int]) -> SplitTest:
    """The test of the module docstring on two classes' half maps ``(half1, half2)``, each ``(D, D, D)`` in
    one frame, under ``mask`` ``(D, D, D)``."""
    a1, a2 = (m * mask for m in class_a)
    b1, b2 = (m * mask for m in class_b)

    def curve(x: Tensor, y: Tensor) -> np.ndarray:
        return fsc(x, y)[1].double().cpu().numpy()

    within_a, within_b = curve(a1, a2), curve(b1, b2)
    across = 0.5 * (curve(a1, b2) + curve(a2, b1))
    measured = (within_a > SIGNAL_FSC) & (within_b > SIGNAL_FSC)
    measured[0] = False  # the mean density: alike by construction
    if int(measured.sum()) < MIN_SHELLS:
        return SplitTest(float("nan"), float("nan"), int(measured.sum()), sizes)
    rho = across[measured] / np.sqrt(within_a[measured] * within_b[measured])
    return SplitTest(float(1.0 - rho.mean()), float(rho.min()), int(measured.sum()), sizes)
