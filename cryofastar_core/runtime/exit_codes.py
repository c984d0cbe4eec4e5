"""Exit codes and SIGTERM handling, shared by the three entry points.

``cryofastar`` (:mod:`cryofastar_core.cli.main`), ``cryofastar-relion`` (:mod:`relion_external.main`) and
``cryofastar-cryosparc`` (:mod:`plugin.cli`) decide here, and only here, what a signal does and which exit
code an outcome gets; each keeps its own way of *telling* the user (a line on stderr, RELION's ``run.err``
and exit markers, a CryoSPARC job log):

====  =====================================================================================
0     success (or nothing to do)
2     bad input (:class:`~cryofastar_core.runtime.errors.InputError`)
3     unusable weights (:class:`~cryofastar_core.runtime.errors.WeightsError`)
130   interrupted (Ctrl-C, ``KeyboardInterrupt``)
143   terminated (SIGTERM: ``scancel``, a queue's time limit), i.e. 128 + SIGTERM
1     unexpected internal error (a bug: any other exception)
====  =====================================================================================

Any other :class:`~cryofastar_core.runtime.errors.CryoFastARError` exits with its class's ``exit_code`` (the
CryoSPARC adapter's server errors use 4).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from cryofastar_core.runtime.errors import CryoFastARError, InputError, WeightsError

OK = 0
INTERNAL_ERROR = 1
BAD_INPUT = InputError.exit_code  # 2; the error classes carry their codes
BAD_WEIGHTS = WeightsError.exit_code  # 3
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATED = 128 + int(signal.SIGTERM)  # 143


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C (``finally`` blocks run, temporary outputs are removed, a
    RELION job is marked failed, a CryoSPARC External job is stopped) instead of dying on the spot."""

    def __init__(self, message: str = "terminated (SIGTERM)"):
        super().__init__(message)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`; the previous handler comes back afterwards.

    Main thread only (Python's rule for signal handlers).
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: BaseException) -> int:
    """The process exit code for a run that ended with ``exc`` (see the table above).

    ``SystemExit`` and other ``BaseException``s that are not ours are not a run's outcome: a
    ``ValueError`` asks the caller to let them propagate.
    """
    if isinstance(exc, CryoFastARError):
        return int(exc.exit_code)
    if isinstance(exc, Terminated):
        return TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, Exception):
        return INTERNAL_ERROR
    raise ValueError(f"{type(exc).__name__} has no exit code; let it propagate")
