"""The one progress interface between the engine and its front ends.

The engine (the job, pose estimation, refinement, reconstruction, simulation) reports progress only by
calling a :class:`Progress` callback, ``progress(stage, done, total)``: ``done`` of ``total`` items of the
stage named ``stage`` are finished (``"poses"``, ``"reconstruct"``, ``"refine 1/3"``, ``"simulate"``, ...;
a stage may run again, counting from the start). It draws nothing itself and reads no environment
variable about it. Under ``torchrun`` only rank 0 calls it.

Each front end chooses how progress is shown:

- ``cryofastar run``, ``demo``, ``simulate`` and ``cryofastar-cryosparc --cs`` (offline): terminal bars,
  :func:`cryofastar_core.cli.progress.terminal_progress` (tqdm, on a terminal only);
- the RELION External job: lines in ``run.out`` and abort polling, ``relion_external.main.ProgressReporter``;
- the CryoSPARC connector: one live line per stage in the job's event log, ``plugin.connector._JobLog.progress``.
"""
from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """``progress(stage, done, total)``: ``done`` of ``total`` items of ``stage`` are finished."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...
