"""A 2D classification beside a particle file: the class averages and each particle's 2D alignment.

:func:`find_class_averages` takes a RELION STAR (here) or a CryoSPARC ``.cs``
(:mod:`cryofastar_core.io.cs_class2d`) and gives both in one form, :class:`ClassAverages`, in the internal pose
convention.

RELION's Class2D writes ``run_itNNN_data.star`` (every particle's ``rlnClassNumber``, in-plane
``rlnAnglePsi`` and ``rlnOriginX/YAngst`` against its class average) next to ``run_itNNN_model.star``
(``model_classes``: ``rlnReferenceImage`` = ``k@run_itNNN_classes.mrcs`` for class ``k``, and
``rlnClassDistribution``); a Select job writes ``particles.star`` (the chosen classes' particles,
class numbers unchanged) next to ``class_averages.star`` (the chosen averages, named the same way).
Given either particle STAR, :func:`find_class_averages` finds the averages as RELION names them.

Class averages are in RELION's CTF-corrected form and in the particles' contrast: they take the
model's preprocessing without a CTF correction. Class images paths are relative to the RELION project
folder (a job folder's grandparent), or to the STAR's own folder when moved together.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryofastar_core.io.class_averages import ClassAverages, members_and_images
from cryofastar_core.io.cs_class2d import find_cs_class_averages
from cryofastar_core.io.particle_set import ParticleSet
from cryofastar_core.io.poses import euler_to_rotations
from cryofastar_core.io.paths import relion_bases, resolve_image_path
from cryofastar_core.runtime.errors import InputError

CLASS = "rlnClassNumber"
REFERENCE_IMAGE = "rlnReferenceImage"
_DATA_SUFFIX = re.compile(r"_data\.star$")


def averages_star_for(particles_star: Path) -> Path | None:
    """The STAR RELION writes beside ``particles_star`` that names its class averages, if there is one:
    ``X_model.star`` for ``X_data.star`` (Class2D), ``class_averages.star`` for a Select job's output."""
    candidates = []
    if _DATA_SUFFIX.search(particles_star.name):
        candidates.append(particles_star.with_name(_DATA_SUFFIX.sub("_model.star", particles_star.name)))
    candidates.append(particles_star.with_name("class_averages.star"))
    return next((c for c in candidates if c.is_file()), None)


def find_class_averages(particles: ParticleSet) -> ClassAverages | None:
    """The 2D classification of a particle file, or ``None`` when it has none: for a RELION STAR no
    ``rlnClassNumber``, no averages STAR beside it, or a 3D model STAR; for a CryoSPARC ``.cs``
    see :func:`~cryofastar_core.io.cs_class2d.find_cs_class_averages`."""
    if particles.source_format == "cryosparc":
        return find_cs_class_averages(particles)
    if particles.source_format not in ("relion31", "relion30") or CLASS not in particles.table.columns:
        return None
    averages_star = averages_star_for(Path(particles.source))
    if averages_star is None:
        return None
    table = _reference_table(averages_star)
    if table is None:
        return None
    classes = particles.table[CLASS].to_numpy()
    if not np.issubdtype(classes.dtype, np.integer) or classes.min() < 1:
        raise InputError(particles.source, CLASS, "class numbers must be whole numbers from 1",
                         "give the particle STAR exactly as RELION's Class2D or Select job wrote it")
    named = _class_images(averages_star, table, particles.project_dir)
    numbers, images, member = members_and_images(particles, classes, named, averages_star, CLASS, REFERENCE_IMAGE,
                                                 "Class2D iteration or Select job")
    in_plane, shifts = _alignments_2d(particles)
    return ClassAverages(numbers=numbers, images=images, member=member, source=averages_star, in_plane=in_plane,
                         shifts=shifts)


def _alignments_2d(particles: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's in-plane rotation (from ``rlnAnglePsi``) and shift (px, from its origin) against its class."""
    table = particles.table
    if "rlnAnglePsi" not in table.columns:
        raise InputError(particles.source, "rlnAnglePsi", "2D classes without in-plane angles",
                         "give the particle STAR exactly as RELION's Class2D or Select job wrote it")
    psi = table["rlnAnglePsi"].to_numpy(dtype=np.float64)
    zeros = np.zeros_like(psi)
    shifts = particles.shifts if particles.shifts is not None else np.zeros((len(psi), 2))
    return euler_to_rotations(zeros, zeros, psi), np.asarray(shifts, dtype=np.float64)


def _reference_table(path: Path) -> pd.DataFrame | None:
    """The table listing 2D class averages, or ``None`` for a 3D model (``rlnReferenceDimensionality`` 3)."""
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        raise InputError(path, None, f"not a readable STAR file ({exc})", "give the STAR exactly as RELION wrote it") from exc
    general = blocks.get("model_general")
    if isinstance(general, dict) and int(general.get("rlnReferenceDimensionality", 2)) != 2:
        return None
    return next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and REFERENCE_IMAGE in b.columns), None)


def _class_images(star: Path, table: pd.DataFrame, project_dir: Path | None) -> dict[int, tuple[Path, int]]:
    """Class number -> (stack, 0-based slice): class ``k`` is slice ``k`` of the classes stack. Paths are
    looked up as the particles' are (:func:`~cryofastar_core.io.paths.relion_bases`)."""
    bases = relion_bases(star, project_dir)
    out: dict[int, tuple[Path, int]] = {}
    for name in table[REFERENCE_IMAGE].astype(str):
        index, _, stack = name.partition("@")
        if not index.isdigit() or not stack:
            raise InputError(star, REFERENCE_IMAGE, f"'{name}' is not of the form N@stack.mrcs",
                             "give the STAR exactly as RELION wrote it")
        out[int(index)] = (resolve_image_path(stack, bases, star, REFERENCE_IMAGE), int(index) - 1)
    return out
