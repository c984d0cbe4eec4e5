"""Progress bars on a terminal: the command line's renderer of the engine's progress callback
(:class:`cryofastar_core.runtime.progress.Progress`). Not a subcommand."""
from __future__ import annotations

import sys

from cryofastar_core.runtime.progress import Progress


class TqdmProgress:
    """One tqdm bar per stage on ``stream`` (default stderr): opened at the stage's first report, closed
    when it completes or another stage reports (a stage that runs again gets a new bar)."""

    def __init__(self, unit: str = "particle", stream=None):
        self.unit, self.stream = unit, stream
        self._stage: str | None = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=total, desc=stage, unit=self.unit, dynamic_ncols=True, mininterval=1.0,
                             file=self.stream if self.stream is not None else sys.stderr)
        bar = self._bar
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


def terminal_progress(unit: str = "particle", stream=None) -> Progress | None:
    """:class:`TqdmProgress` when ``stream`` (default stderr) is a terminal; None (no progress shown)
    otherwise, e.g. in a queue system's log file, where a bar is noise and ``report.json`` has the timings."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return TqdmProgress(unit, stream) if isatty is not None and isatty() else None
