"""Scratch copies of images derived from a particle set (its images Fourier-cropped to a smaller box).

Refinement at a cropped box reads every particle several times (the global pass over all particles, then
each local iteration): cropping on every read Fourier-transforms the input-box images again each time,
which at box 256 costs more than the matching itself (``bench/scale_benchmark.py``). An
:class:`ImageScratch` keeps each derived image in a file the first time it is made and reads it back after,
as RELION's ``--scratch_dir`` keeps a copy of the particles on local disk.

Memory stays bounded by one request: the file is read and written with positioned reads and writes (no
memory map, whose pages would count towards the job's resident memory), and only a flag per particle is
held. The file holds ``N x box^2`` float32 values; a box whose file would not leave room on the disk is not
kept (the images are then made on every read, as without a scratch). Values read back are the values made.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from cryofastar_core.io.mrc import consecutive_runs

log = logging.getLogger(__name__)

# A scratch file is only made when the disk keeps at least this fraction of its free space after it.
KEEP_FREE = 0.5


class ImageScratch:
    """Derived images of ``n`` particles by box, each made once (by the ``make`` a read is given) and then
    read back from ``folder/<tag>b<box>.f32``. :meth:`close` removes the files."""

    def __init__(self, folder: str | Path, n: int, tag: str = ""):
        self.folder, self.n, self.tag = Path(folder), int(n), tag
        self._files: dict[int, _ScratchFile | None] = {}
        self._lock = threading.Lock()

    def read(self, indices: np.ndarray, box: int, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Images ``(len(indices), box, box)`` float32 of particles ``indices`` (0-based, any order):
        those not yet kept are made by ``make(missing_indices)`` and kept."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        with self._lock:
            file = self._file(box)
            if file is None:
                return np.asarray(make(idx), dtype=np.float32)
            return file.read(idx, make)

    def _file(self, box: int) -> "_ScratchFile | None":
        if box not in self._files:
            size = self.n * box * box * 4
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
            if size > KEEP_FREE * free:
                log.info("scratch: box-%d images of %d particles (%.1f GB) not kept: %.1f GB free in %s", box,
                         self.n, size / 1e9, free / 1e9, self.folder)
                self._files[box] = None
            else:
                self._files[box] = _ScratchFile(self.folder / f"{self.tag}b{box}.f32", self.n, box)
        return self._files[box]

    def close(self) -> None:
        """Remove the scratch files (and the folder when it is left empty)."""
        with self._lock:
            for file in self._files.values():
                if file is not None:
                    file.remove()
            self._files.clear()
        try:
            self.folder.rmdir()
        except OSError:
            pass


class _ScratchFile:
    """``n`` images of ``box^2`` float32 in one file, and which of them are written."""

    def __init__(self, path: Path, n: int, box: int):
        self.path, self.box = path, box
        self.image_bytes = box * box * 4
        self.kept = np.zeros(n, dtype=bool)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, n * self.image_bytes)  # sparse: blocks are allocated as images are written

    def read(self, idx: np.ndarray, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.empty((idx.shape[0], self.box, self.box), dtype=np.float32)
        new = ~self.kept[idx]
        if new.any():
            made = np.asarray(make(idx[new]), dtype=np.float32)
            out[new] = made
            self._write(idx[new], made)
        old = ~new
        if old.any():
            out[old] = self._read(idx[old])
        return out

    def _write(self, idx: np.ndarray, images: np.ndarray) -> None:
        uniq, inverse, runs = consecutive_runs(idx)
        first = np.empty(len(uniq), dtype=np.int64)
        first[inverse[::-1]] = np.arange(len(idx))[::-1]  # one image per particle (duplicates are equal)
        for a, b in runs:
            block = np.ascontiguousarray(images[first[a:b]])
            os.pwrite(self.fd, block.tobytes(), int(uniq[a]) * self.image_bytes)
        self.kept[uniq] = True

    def _read(self, idx: np.ndarray) -> np.ndarray:
        uniq, inverse, runs = consecutive_runs(idx)
        block = np.empty((len(uniq), self.box, self.box), dtype=np.float32)
        for a, b in runs:
            size = int(b - a) * self.image_bytes
            buf = os.pread(self.fd, size, int(uniq[a]) * self.image_bytes)
            block[a:b] = np.frombuffer(buf, dtype=np.float32).reshape(-1, self.box, self.box)
        return block[inverse]

    def remove(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
