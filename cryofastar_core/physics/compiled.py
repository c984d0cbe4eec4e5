"""The compiled slice kernels (``slice_kernels.c``), when the install built them.

``setup.py`` builds ``slice_kernels.c`` as an optional extension (``_slice_kernels*.so`` beside this file);
it has no Python entry point and is called through ``ctypes``, which releases the GIL, so threads share
the work. Where it was not built (no C compiler at install time), or for tensors that are not float32 /
complex64 on the CPU, callers keep their torch paths (``projection.project_at`` /
``backproject.Backprojector``); :func:`backend` says which one runs (the job logs it).
``CRYOFASTAR_NO_COMPILED=1`` forces the torch paths (benchmarks and tests compare the two).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

_HERE = Path(__file__).resolve().parent
_NAME = "_slice_kernels"


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{_NAME}{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.cfa_insert_slices.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64]
            lib.cfa_insert_slices.restype = None
            lib.cfa_sample_slices.argtypes = [i64, i64, ptr, ptr, ptr, ptr, i64, ptr]
            lib.cfa_sample_slices.restype = None
            return lib
    return None


def backend() -> str:
    """``"compiled"`` when CPU float32 slices use the kernels, else ``"torch"``."""
    if os.environ.get("CRYOFASTAR_NO_COMPILED") == "1" or _library() is None:
        return "torch"
    return "compiled"


def usable_for(*tensors: Tensor) -> bool:
    """Whether the kernels can work on these tensors: every one contiguous, complex64 or float32, on the CPU."""
    return backend() == "compiled" and all(
        t.device.type == "cpu" and t.dtype in (torch.complex64, torch.float32) and t.is_contiguous() for t in tensors)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def sample_slices(volume: Tensor, rotations: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    """Trilinear samples ``(B, M)`` complex64 of the centred complex grid ``volume`` ``(n, n, n)`` at
    ``R (qx, qy, 0)`` for rotations ``(B, 3, 3)`` and positions ``qx``, ``qy`` ``(M,)`` in grid units from
    the centre; 0 outside the grid. Split over torch's thread count (one slice block per thread)."""
    B, M, n = rotations.shape[0], qx.shape[0], volume.shape[-1]
    rot, qx, qy = _f32(rotations), _f32(qx), _f32(qy)
    vol = torch.view_as_real(volume)
    out = torch.empty((B, M), dtype=torch.complex64)
    flat = torch.view_as_real(out)
    lib = _library()

    def run(a: int, b: int) -> None:
        lib.cfa_sample_slices(b - a, M, rot[a:b].data_ptr(), qx.data_ptr(), qy.data_ptr(), vol.data_ptr(), n,
                              flat[a:b].data_ptr())

    parts = max(1, min(B, torch.get_num_threads()))
    bounds = [(B * i // parts, B * (i + 1) // parts) for i in range(parts)]
    if parts == 1:
        run(0, B)
    else:
        for future in [_pool(parts).submit(run, a, b) for a, b in bounds]:
            future.result()
    return out


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cfa-slices")


def insert_slices(rotations: Tensor, qx: Tensor, qy: Tensor, values: Tensor, weights: Tensor,
                  numerator: Tensor, weight: Tensor) -> None:
    """Add ``values`` ``(B, M)`` complex64 and ``weights`` ``(B, M)`` float32 (any strides, e.g. an
    expanded ``(B, 1)``), the samples at oversampled-grid positions ``qx``, ``qy`` ``(M,)`` of the slices
    with rotations ``(B, 3, 3)``, into the half-spectrum accumulators ``numerator`` / ``weight``
    ``(nz, ny, nx)`` with trilinear weights (one thread: the two half sets run side by side)."""
    B, M = values.shape
    if weights.shape != (B, M):
        raise ValueError(f"insert_slices: weights {tuple(weights.shape)} do not match values {(B, M)}")
    rot, qx, qy = _f32(rotations), _f32(qx), _f32(qy)
    vals = torch.view_as_real(values.to(torch.complex64).contiguous())
    w = weights.to(torch.float32)
    nz, ny, nx = numerator.shape
    _library().cfa_insert_slices(B, M, rot.data_ptr(), qx.data_ptr(), qy.data_ptr(), vals.data_ptr(),
                                 w.data_ptr(), w.stride(0), w.stride(1), numerator.data_ptr(), weight.data_ptr(),
                                 nz, ny, nx)
