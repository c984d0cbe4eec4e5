"""Reading a particle file: the one entry point, :func:`read_particles`, dispatching on the file type.

:class:`ParticleSet` itself lives in :mod:`cryofastar_core.io.particle_set` (re-exported here and from
:mod:`cryofastar_core.io`), below the format modules, so the io modules import in one direction:
``particle_set`` and ``relion_tables`` <- ``cs`` <- ``star`` <- ``particles`` (checked by
``tests/test_io_imports.py``, function-local imports included).
"""
from __future__ import annotations

from pathlib import Path

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io.cs import read_cs_particles
from cryofastar_core.io.particle_set import CTF_FIELDS, ParticleSet, as_indices, check_stacks
from cryofastar_core.io.star import read_star_particles

__all__ = ["CTF_FIELDS", "ParticleSet", "as_indices", "check_stacks", "read_particles"]


def read_particles(path: str | Path, project_dir: Path | None = None) -> ParticleSet:
    """Read a RELION ``.star`` (3.0 or 3.1+) or CryoSPARC ``.cs`` particle file, checking it fully.

    Relative image paths are resolved against ``project_dir`` (default: the working directory) first,
    then against the folder of the particle file (for ``.cs`` also its parent, CryoSPARC's project).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "particle file not found", "check the path")
    suffix = path.suffix.lower()
    if suffix == ".star":
        return read_star_particles(path, project_dir)
    if suffix == ".cs":
        return read_cs_particles(path, project_dir)
    if suffix in (".mrcs", ".mrc"):
        star = _star_listing(path)
        fix = (f"give the STAR file that lists it, e.g. --particles {star}" if star is not None else
               "give the RELION .star (or CryoSPARC .cs) file that lists this stack: it holds the CTF and "
               "optics the images need")
        raise InputError(path, None, "this is an image stack, not a particle file", fix)
    raise InputError(path, None, f"unknown particle file type '{path.suffix}'",
                     "give a RELION .star or a CryoSPARC .cs file")


def _star_listing(stack: Path, max_files: int = 50) -> Path | None:
    """A ``.star`` beside ``stack`` or one folder up whose text names it (for the error message only:
    bounded to ``max_files`` files, each read line by line until the name appears)."""
    folders = [stack.parent, stack.parent.parent]
    candidates = [f for d in dict.fromkeys(folders) if d.is_dir() for f in sorted(d.glob("*.star"))][:max_files]
    for star in candidates:
        try:
            with open(star, errors="replace") as fh:
                if any(stack.name in line for line in fh):
                    return star
        except OSError:
            continue
    return None
