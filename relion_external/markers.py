"""RELION's job marker files: the exit markers we write and the abort request we poll for.

RELION ignores the exit code of an External program (it runs it in the background) and only watches for
``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` / ``_ABORTED`` in the job folder. The GUI's Abort button only
creates ``RELION_JOB_ABORT_NOW``; the program must notice it itself (RELION 3.1, in
``tests/test_relion_external_pipeline.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
EXIT_MARKERS = {"success": SUCCESS, "failure": FAILURE, "aborted": ABORTED}


class JobAborted(Exception):
    """The user asked RELION to abort the job (``RELION_JOB_ABORT_NOW`` appeared)."""


class JobMarkers:
    """The marker files of one job folder."""

    def __init__(self, job_dir: str | Path):
        self.job_dir = Path(job_dir)

    def abort_requested(self) -> bool:
        return (self.job_dir / ABORT_NOW).exists()

    def check_abort(self) -> None:
        """Raise :class:`JobAborted` if the user pressed Abort."""
        if self.abort_requested():
            raise JobAborted(f"abort requested ({self.job_dir / ABORT_NOW} exists)")

    def finish(self, status: str) -> Path:
        """Leave exactly one exit marker, ``status`` in ``success``/``failure``/``aborted``.

        Stale markers of an earlier run outside RELION are removed first (RELION itself clears them
        before each run). On abort the request file is removed too, as RELION's own programs do.
        """
        marker = EXIT_MARKERS[status]
        self.job_dir.mkdir(parents=True, exist_ok=True)
        for other in EXIT_MARKERS.values():
            if other != marker:
                (self.job_dir / other).unlink(missing_ok=True)
        if status == "aborted":
            (self.job_dir / ABORT_NOW).unlink(missing_ok=True)
        path = self.job_dir / marker
        # An empty file created in one step: RELION only tests that it exists.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
        return path
