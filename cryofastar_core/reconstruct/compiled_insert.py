"""The compiled insertion kernel (``insert_kernel.c``), when the install built it.

``setup.py`` builds ``insert_kernel.c`` as an optional extension (``_insert_kernel*.so`` beside this
file); it has no Python entry point and is called through ``ctypes``, which releases the GIL, so the two
half sets' insertions still run side by side. Where it was not built (no C compiler at install time) or
the accumulators are not float32 on the CPU, :class:`~cryofastar_core.reconstruct.backproject.Backprojector`
keeps its torch path; :func:`insertion_backend` says which one runs (the job logs it).
``CRYOFASTAR_TORCH_INSERT=1`` forces the torch path (benchmarks compare the two).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

_HERE = Path(__file__).resolve().parent
_NAME = "_insert_kernel"


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{_NAME}{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            fn = lib.cfa_insert_slices
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64]
            fn.restype = None
            return lib
    return None


def insertion_backend() -> str:
    """``"compiled"`` when CPU float32 insertions use the kernel, else ``"torch"``."""
    if os.environ.get("CRYOFASTAR_TORCH_INSERT") == "1" or _library() is None:
        return "torch"
    return "compiled"


def usable_for(numerator: Tensor, weight: Tensor) -> bool:
    """Whether the kernel can fill these accumulators (contiguous complex64 / float32 on the CPU)."""
    return (insertion_backend() == "compiled" and numerator.device.type == "cpu"
            and numerator.dtype == torch.complex64 and weight.dtype == torch.float32
            and numerator.is_contiguous() and weight.is_contiguous())


def insert_slices(rotations: Tensor, qx: Tensor, qy: Tensor, values: Tensor, weights: Tensor,
                  numerator: Tensor, weight: Tensor) -> None:
    """Add ``values`` ``(B, M)`` complex64 and ``weights`` ``(B, M)`` float32 (any strides, e.g. an
    expanded ``(B, 1)``), the samples at oversampled-grid positions ``qx``, ``qy`` ``(M,)`` of the images
    with rotations ``(B, 3, 3)``, into the half-spectrum accumulators ``numerator`` / ``weight``
    ``(nz, ny, nx)`` with trilinear weights (see ``insert_kernel.c``)."""
    B, M = values.shape
    if weights.shape != (B, M):
        raise ValueError(f"insert_slices: weights {tuple(weights.shape)} do not match values {(B, M)}")
    rot = rotations.to(torch.float32).contiguous()
    qx, qy = qx.to(torch.float32).contiguous(), qy.to(torch.float32).contiguous()
    vals = torch.view_as_real(values.to(torch.complex64).contiguous())
    w = weights.to(torch.float32)
    nz, ny, nx = numerator.shape
    _library().cfa_insert_slices(B, M, rot.data_ptr(), qx.data_ptr(), qy.data_ptr(), vals.data_ptr(),
                                 w.data_ptr(), w.stride(0), w.stride(1), numerator.data_ptr(), weight.data_ptr(),
                                 nz, ny, nx)
