"""Give the pages of freed temporaries back to the system between chunks.

Every pass of refinement allocates and frees the same kinds of temporaries chunk after chunk (images, their
transforms, score blocks: megabytes each), of sizes that vary with each chunk's split into half sets, while
small per-particle results live on between them. glibc serves such blocks from its heap once its adaptive
mmap threshold has risen past them, the heap fragments around the survivors and its free pages stay
resident: the job's resident memory grew with the number of particles while its live data stayed below
1 GB (``bench/results/2026-12-06-scale.md``, session 14). :func:`release_free_memory` (glibc
``malloc_trim``) hands the free pages back once resident memory has grown by ``GROWTH_BYTES`` since it
last did: called after every chunk, it trims only when fragmentation has built up, so the pages a compact
heap reuses chunk after chunk are not faulted in again each time (serving every large block by ``mmap``
instead cost 56 % more time at 10,000 particles).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache


GROWTH_BYTES = 256 << 20


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` elsewhere (the allocator then keeps its own policy)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_last = {"resident": 0}  # resident memory after the last trim


def release_free_memory(growth: int = GROWTH_BYTES) -> bool:
    """Return the allocator's free pages to the system (glibc ``malloc_trim(0)``) once resident memory has
    grown by more than ``growth`` bytes since the last time; ``True`` if it trimmed. Elsewhere than glibc,
    or where resident memory cannot be read, it does nothing (``False``)."""
    trim, now = _malloc_trim(), resident_bytes()
    if trim is None or now == 0 or now - _last["resident"] <= growth:
        return False
    trim(0)
    _last["resident"] = resident_bytes()
    return True
