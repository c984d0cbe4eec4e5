"""Offline mode: a CryoSPARC ``.cs`` in, ``.cs`` with ``alignments3D`` (plus STAR and maps) out, no server.

``blob/path`` in the ``.cs`` is relative to the CryoSPARC project folder, given as ``project_dir``
(default: the ``.cs`` file's grandparent, i.e. ``<project>/Jnn/file.cs``, then the working folder).
Writes ``out_dir/particles.cs`` (input fields and uids passed through, new ``alignments3D``),
``out_dir/particles.star`` (RELION 3.1) and ``map.mrc``, ``half1.mrc``, ``half2.mrc``, the plots and
``report.json``. Import ``particles.cs`` into CryoSPARC with an Import Result Group job, or join it to
the original particles in a notebook.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.job import Report, run
from cryofastar_core.runtime.progress import Progress
from plugin.connector import engine_config


def run_offline(cs_path: str | Path, out_dir: str | Path, project_dir: str | Path | None = None,
                progress: Progress | None = None, **job_options: Any) -> Report:
    """Run the engine on a ``.cs`` file; ``job_options`` are :class:`cryofastar_core.job.JobConfig` fields;
    ``progress`` is the engine's progress callback (:mod:`cryofastar_core.runtime.progress`; None: not shown)."""
    cs_path = Path(cs_path)
    if cs_path.suffix.lower() != ".cs":
        raise InputError(cs_path, None, "not a .cs file", "give a CryoSPARC particle .cs (or use `cryofastar run` for STAR)")
    if not cs_path.is_file():
        raise InputError(cs_path, None, "file not found", "check the path given to --cs")
    if project_dir is not None and not Path(project_dir).is_dir():
        raise InputError(project_dir, None, "project folder not found",
                         "give the CryoSPARC project folder that blob/path is relative to (--project-dir)")
    cfg = engine_config(job_options, cs_path, Path(out_dir), Path(project_dir) if project_dir is not None else None)
    report = run(cfg, progress=progress)
    if not (Path(out_dir) / "particles.cs").is_file():
        raise RuntimeError(f"the engine wrote no particles.cs into {out_dir}")
    return report
