"""A CryoSPARC 2D classification beside a particle ``.cs``: its class averages and each particle's 2D alignment.

CryoSPARC's 2D classification writes ``Jn_XXX_particles.cs`` (every particle's ``alignments2D/class``, from 0,
in-plane ``alignments2D/pose`` in radians and ``alignments2D/shift`` in pixels of ``alignments2D/psize_A``)
next to ``Jn_XXX_class_averages.cs`` (one row per class: ``blob/path``, the averages' stack, and ``blob/idx``,
the class's slice in it, which is its class number); a Select 2D job writes ``Jn_particles_selected.cs``
next to ``Jn_templates_selected.cs`` (the chosen averages' rows, unchanged); the CryoSPARC connector writes
``particles.cs`` and ``class_averages.cs``. Given any of these particle files,
:func:`find_cs_class_averages` finds the averages beside it.

Conventions (those of pyem's ``csparc2star``, which moves 2D classifications between the two programs):
``alignments2D/pose`` is the angle of the in-plane rotation ``alignments3D/pose`` would hold as the rotation
vector ``(0, 0, pose)`` (RELION's ``rlnAnglePsi`` in degrees); ``alignments2D/shift`` has the meaning of
``alignments3D/shift``. Neither is checked against a CryoSPARC server's output here (``plugin/README.md``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cryofastar_core.io import poses
from cryofastar_core.io.class_averages import ClassAverages, members_and_images
from cryofastar_core.io.cs import _load, _strings
from cryofastar_core.io.particle_set import ParticleSet
from cryofastar_core.io.paths import resolve_image_path, strip_cryosparc_prefix
from cryofastar_core.runtime.errors import InputError

CLASS = "alignments2D/class"
POSE = "alignments2D/pose"
SHIFT = "alignments2D/shift"
_NAMES = ((re.compile(r"(^|_)particles\.cs$"), r"\1class_averages.cs"),       # 2D classification, the connector
          (re.compile(r"(^|_)particles_selected\.cs$"), r"\1templates_selected.cs"))  # Select 2D


def averages_cs_for(particles_cs: Path) -> Path | None:
    """The ``.cs`` CryoSPARC writes beside ``particles_cs`` that lists its class averages, if there is one."""
    for pattern, suffix in _NAMES:
        if pattern.search(particles_cs.name):
            candidate = particles_cs.with_name(pattern.sub(suffix, particles_cs.name))
            if candidate.is_file():
                return candidate
    return None


def find_cs_class_averages(particles: ParticleSet) -> ClassAverages | None:
    """The 2D classification of a CryoSPARC particle ``.cs``, or ``None`` when it has none (no
    ``alignments2D/class``, or no averages ``.cs`` beside it)."""
    ds = particles.dataset
    fields = set(ds.fields()) if ds is not None else set()
    if CLASS not in fields:
        return None
    averages_cs = averages_cs_for(Path(particles.source))
    if averages_cs is None:
        return None
    for f in (POSE, SHIFT):
        if f not in fields:
            raise InputError(particles.source, f, "2D classes without in-plane alignments",
                             "give the particles .cs exactly as CryoSPARC's 2D classification or Select 2D wrote it")
    classes = np.asarray(ds[CLASS], dtype=np.int64)
    named = _class_images(averages_cs, particles.project_dir)
    numbers, images, member = members_and_images(particles, classes, named, averages_cs, CLASS, "blob/shape",
                                                 "2D classification iteration or Select 2D job")
    in_plane, shifts = _alignments_2d(particles, fields)
    return ClassAverages(numbers=numbers, images=images, member=member, source=averages_cs,
                         in_plane=in_plane, shifts=shifts)


def _class_images(averages_cs: Path, project_dir: Path | None) -> dict[int, tuple[Path, int]]:
    """Class number (``blob/idx``) -> the stack that holds its average and its slice there (the same number)."""
    ds = _load(averages_cs)
    fields = set(ds.fields())
    for f in ("blob/path", "blob/idx"):
        if f not in fields:
            raise InputError(averages_cs, f, "field is missing, so the class averages cannot be found",
                             "give the class averages .cs exactly as CryoSPARC wrote it")
    # As for particles: .cs files sit in <project>/Jnn/, so the file's grandparent is the project folder.
    bases = [Path(project_dir) if project_dir is not None else Path.cwd(), averages_cs.parent.parent, averages_cs.parent]
    out: dict[int, tuple[Path, int]] = {}
    for name, idx in zip(_strings(ds["blob/path"]), np.asarray(ds["blob/idx"], dtype=np.int64)):
        out[int(idx)] = (resolve_image_path(strip_cryosparc_prefix(name), bases, averages_cs, "blob/path"), int(idx))
    return out


def _alignments_2d(particles: ParticleSet, fields: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's in-plane rotation (internal) and shift (blob px) against its class average."""
    ds = particles.dataset
    angle = np.asarray(ds[POSE], dtype=np.float64).reshape(len(particles), -1)[:, 0]
    rotvec = np.zeros((len(angle), 3))
    rotvec[:, 2] = angle
    psize = "alignments2D/psize_A"
    align_psize = np.asarray(ds[psize], dtype=np.float64) if psize in fields else particles.apix.copy()
    shifts = poses.cryosparc_shift_to_shift(np.asarray(ds[SHIFT], dtype=np.float64), align_psize, particles.apix)
    return poses.rotvec_to_rotations(rotvec), shifts
