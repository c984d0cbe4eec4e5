"""MRC maps and image stacks through ``mrcfile``: header checks up front, lazy slice reads (positioned reads)."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io.atomic_write import atomic_output

# MRC modes we can turn into float32 images: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16.
_READABLE_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


@dataclass(frozen=True)
class StackInfo:
    """What the header of an image stack says: ``n`` images of ``ny`` x ``nx`` pixels."""

    path: Path
    n: int
    ny: int
    nx: int
    mode: int
    voxel_size: float


def read_stack_header(path: Path) -> StackInfo:
    """Read and check only the header of an ``.mrcs``/``.mrc`` stack (a 2D ``.mrc`` is a stack of one).

    Also checks that the file is long enough to hold the data the header announces, so a truncated
    stack fails here rather than halfway through a run.
    """
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            h = mrc.header
            nx, ny, nz, mode = int(h.nx), int(h.ny), int(h.nz), int(h.mode)
            nsymbt = int(h.nsymbt)
            voxel = float(mrc.voxel_size.x)
    except (OSError, ValueError) as exc:
        raise InputError(path, None, f"not a readable MRC file ({exc})", "check the file is an MRC image stack") from exc
    if mode not in _READABLE_MODES:
        raise InputError(path, "mode", f"MRC mode {mode} is not supported",
                         "convert the stack to float32, float16 or int16 (e.g. relion_image_handler)")
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(path, "nx/ny/nz", f"header gives an empty image size {nx}x{ny}x{nz}", "re-extract the particles")
    expected = 1024 + nsymbt + nx * ny * nz * np.dtype(_READABLE_MODES[mode]).itemsize
    if os.path.getsize(path) < expected:
        raise InputError(path, None, f"file is truncated ({os.path.getsize(path)} bytes, header needs {expected})",
                         "re-extract or re-copy the stack")
    return StackInfo(Path(path), nz, ny, nx, mode, voxel)


class _OpenStack:
    """One stack opened for positioned reads: its data offset, image shape and on-disk dtype (byte order
    included), from the header."""

    def __init__(self, path: Path):
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
            h = mrc.header
            self.dtype = mrcfile.utils.data_dtype_from_header(h)
            self.shape = (int(h.ny), int(h.nx))
            self.offset = 1024 + int(h.nsymbt)
        self.path = path
        self.image_bytes = self.shape[0] * self.shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def read_run(self, first: int, count: int) -> np.ndarray:
        """``count`` consecutive images from slice ``first`` (0-based), in the file's dtype."""
        size = count * self.image_bytes
        buf = os.pread(self.fd, size, self.offset + first * self.image_bytes)
        if len(buf) != size:
            raise InputError(self.path, None, f"file ends before slice {first + count}",
                             "re-extract or re-copy the stack")
        return np.frombuffer(buf, dtype=self.dtype).reshape(count, *self.shape)

    def read_run_into(self, first: int, count: int, out: np.ndarray) -> None:
        """:meth:`read_run` into ``out`` ``(count, ny, nx)`` float32 (C-contiguous): a native float32 stack
        is read straight into it (one copy, by the kernel), any other dtype converted."""
        if self.dtype == np.dtype(np.float32) and out.flags.c_contiguous:
            size = count * self.image_bytes
            got = os.preadv(self.fd, [memoryview(out).cast("B")], self.offset + first * self.image_bytes)
            if got != size:
                raise InputError(self.path, None, f"file ends before slice {first + count}",
                                 "re-extract or re-copy the stack")
        else:
            out[...] = self.read_run(first, count)

    def close(self) -> None:
        os.close(self.fd)


def consecutive_runs(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """``positions`` sorted and de-duplicated (``uniq``), where each original position went (``inverse``,
    ``uniq[inverse] == positions``) and ``(start, stop)`` into ``uniq`` of each run of consecutive values:
    sorted, de-duplicated access walks a file forwards once, one read or write per run."""
    uniq, inverse = np.unique(np.asarray(positions, dtype=np.int64), return_inverse=True)
    starts = np.flatnonzero(np.diff(uniq, prepend=-2) != 1)
    return uniq, inverse.reshape(-1), list(zip(starts.tolist(), np.append(starts[1:], len(uniq)).tolist()))


class StackReader:
    """Reads chosen slices of many stacks, keeping at most ``max_open`` files open at a time.

    Slices are read with positioned reads (``os.pread``), runs of consecutive slices in one call, and
    copied into the result: memory is bounded by the request, never by the size of a stack, and no page of
    a stack stays mapped into the process (a memory map would count every page read towards the job's
    resident memory until the kernel reclaims it).
    """

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._open: OrderedDict[Path, _OpenStack] = OrderedDict()

    def _stack(self, path: Path) -> _OpenStack:
        stack = self._open.get(path)
        if stack is None:
            stack = _OpenStack(path)
            self._open[path] = stack
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(path)
        return stack

    def read(self, path: Path, slices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Slices (0-based, any order) of one stack -> ``(len(slices), ny, nx)`` float32, into ``out`` if
        given. Slices asked for in increasing order (the usual chunk) go straight into the result."""
        stack = self._stack(path)
        uniq, inverse, runs = consecutive_runs(slices)
        in_order = len(uniq) == len(inverse) and bool((inverse == np.arange(len(inverse))).all())
        if out is None:
            out = np.empty((len(inverse), *stack.shape), dtype=np.float32)
        block = out if in_order and out.flags.c_contiguous else np.empty((len(uniq), *stack.shape), np.float32)
        for a, b in runs:
            stack.read_run_into(int(uniq[a]), int(b - a), block[a:b])
        if block is not out:
            out[...] = block[inverse]
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __del__(self) -> None:
        self.close()


def write_stack(path: str | Path, images: np.ndarray, apix: float) -> None:
    """Write ``images`` ``(n, ny, nx)`` (or one ``(ny, nx)``) as a float32 MRC stack with voxel size ``apix``."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(images)
            mrc.set_image_stack()
            mrc.voxel_size = (apix, apix, apix)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a cubic map -> ``(V[z, y, x] float32 (D, D, D), apix)`` with ``apix`` from the header voxel size."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, "map file not found", "check the path")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            apix = float(mrc.voxel_size.x)
    except (OSError, ValueError) as exc:
        raise InputError(path, None, f"not a readable MRC map ({exc})", "check the file is an MRC map") from exc
    if data is None or data.ndim != 3 or len(set(data.shape)) != 1:
        shape = None if data is None else data.shape
        raise InputError(path, "nx/ny/nz", f"map is not a cube (shape {shape})", "resize or pad the map to a cube")
    if not np.isfinite(data).all():
        raise InputError(path, "data", "map contains NaN or infinite values", "fix or regenerate the map")
    if not apix > 0:
        raise InputError(path, "voxel size", "header has no pixel size (voxel size 0)",
                         "set it, e.g. relion_image_handler --i map.mrc --o fixed.mrc --angpix <Å/px>")
    return data, apix


def write_map(path: str | Path, volume: np.ndarray, apix: float) -> None:
    """Write ``V[z, y, x]`` as a float32 MRC map: voxel size ``apix``, origin 0."""
    volume = np.asarray(volume, dtype=np.float32)
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.set_volume()
            mrc.voxel_size = (apix, apix, apix)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
