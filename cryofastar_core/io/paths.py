"""Resolve image paths from particle tables the way RELION and CryoSPARC do."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cryofastar_core.runtime.errors import InputError


def strip_cryosparc_prefix(name: str) -> str:
    """CryoSPARC marks some exported paths with a leading ``>``; it is not part of the path."""
    return name[1:] if name.startswith(">") else name


def relion_bases(table_file: Path, project_dir: Path | None) -> list[Path]:
    """Where RELION-named paths in ``table_file`` are looked for, in order: ``project_dir`` (default: the
    working directory, as RELION runs from the project folder), the table's own folder, then the two above
    it (a job's STAR, ``Class2D/job010/run_it025_data.star``, names files from the project folder)."""
    return [Path(project_dir) if project_dir is not None else Path.cwd(), table_file.parent, table_file.parent.parent,
            table_file.parent.parent.parent]


def resolve_image_path(name: str, bases: Sequence[Path], table_file: Path, field: str) -> Path:
    """First existing ``base / name`` over ``bases`` (absolute names are taken as they are).

    RELION resolves ``rlnImageName`` against its working directory (the project folder); a STAR moved
    together with its stacks is found through the STAR's own folder, which callers list as a fallback.
    Raises :class:`InputError` naming every place that was looked at.
    """
    p = Path(name)
    if p.is_absolute():
        if p.is_file():
            return p
        tried = [p]
    else:
        tried = []
        for base in bases:
            cand = Path(base) / p
            if cand.is_file():
                return cand.resolve()
            tried.append(cand.resolve() if Path(base).is_absolute() else Path(base).absolute() / p)
    places = " or ".join(str(t) for t in dict.fromkeys(tried))
    raise InputError(table_file, field, f"image stack '{name}' not found (looked for {places})",
                     "run from the project folder the paths are relative to, pass --project-dir, "
                     "or fix the path in the table")
