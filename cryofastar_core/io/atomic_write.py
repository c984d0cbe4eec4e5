"""Write-then-rename, so an interrupted run never leaves a half-written output."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    # mkstemp/mkdtemp create private files; a finished output gets an ordinary file's permissions.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    The temporary name keeps the suffix of ``path`` because some writers choose the format from it.
    The folder must exist (it is not created: a missing output folder is the caller's mistake to report).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out_dir`` (created if needed); on success move every file
    in it into ``out_dir`` (the names in ``last`` last, in that order), on error delete it.

    Outputs that belong together thus appear only once all of them are complete, and a "finished"
    marker (e.g. the STAR file that names the stacks) appears last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cryofastar-staging-", dir=out_dir))
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir() if p.name not in last)
        names += [n for n in last if (staging / n).exists()]
        for name in names:
            _publish(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
