"""The class averages of a 2D classification and each particle's 2D alignment, in one form for every host
(filled by :mod:`cryofastar_core.io.class2d` for RELION and :mod:`cryofastar_core.io.cs_class2d` for CryoSPARC)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryofastar_core.io.mrc import StackReader
from cryofastar_core.io.particle_set import ParticleSet
from cryofastar_core.runtime.errors import InputError


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


def members_and_images(particles: ParticleSet, classes: np.ndarray, named: dict[int, tuple[Path, int]],
                       averages_file: Path, class_field: str, box_field: str,
                       same_source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(numbers, images, member)`` of :class:`ClassAverages` from each particle's class number ``classes``
    ``(N,)`` and ``named`` (class number -> its average's stack and 0-based slice, as ``averages_file``
    lists them). Raises :class:`InputError` for a class the file does not list (naming ``class_field``;
    ``same_source`` says which averages belong together) or averages of another box (naming ``box_field``)."""
    missing = sorted(set(classes.tolist()) - set(named))
    if missing:
        raise InputError(particles.source, class_field, f"particles belong to classes {missing[:5]} that "
                         f"{averages_file.name} does not list", f"give the particles and class averages of the "
                         f"same {same_source}")
    numbers = np.array(sorted(set(classes.tolist())), dtype=np.int64)
    reader = StackReader()
    images = np.stack([reader.read(named[c][0], np.array([named[c][1]]))[0] for c in numbers]).astype(np.float32)
    reader.close()
    if images.shape[-1] != particles.box:
        raise InputError(averages_file, box_field, f"class averages are {images.shape[-1]} px, the particles "
                         f"{particles.box} px", "give the class averages made from these particles")
    return numbers, images, np.searchsorted(numbers, classes)
