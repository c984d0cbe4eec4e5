"""The class averages of a 2D classification and each particle's 2D alignment, in one form for every host
(filled by :mod:`cryofastar_core.io.class2d` for RELION and :mod:`cryofastar_core.io.cs_class2d` for CryoSPARC)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ClassAverages:
    """The class averages that have members: ``numbers`` ``(C,)`` class numbers as the classification names
    them (RELION from 1, CryoSPARC from 0), ``images`` ``(C, D, D)`` float32 raw pixels; ``member`` ``(N,)``
    each particle's row in ``numbers``; ``source`` the file that named the averages; each particle's 2D
    alignment against its class average: ``in_plane`` ``(N, 3, 3)`` an in-plane rotation and ``shifts``
    ``(N, 2)`` px, in the internal convention (:mod:`cryofastar_core.geometry`)."""

    numbers: np.ndarray
    images: np.ndarray
    member: np.ndarray
    source: Path
    in_plane: np.ndarray
    shifts: np.ndarray
