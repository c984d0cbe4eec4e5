"""Freed heap pages go back to the system once resident memory has grown (cryofastar_core/runtime/memory.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from cryofastar_core.runtime import memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._malloc_trim() is None, reason="glibc only")
def test_fragmented_heap_pages_are_returned_after_growth():
    memory.release_free_memory(growth=0)                      # start from a trimmed heap
    blocks = [np.ones(12_000) for _ in range(5_000)]         # 96 kB each, served from the heap: 480 MB
    del blocks[::2]                                          # half freed, between survivors: no heap shrink
    before = memory.resident_bytes()
    assert not memory.release_free_memory(growth=1 << 40)    # not grown enough: nothing done
    assert memory.release_free_memory(growth=0)
    after = memory.resident_bytes()
    print(f"resident {before / 2**20:.0f} -> {after / 2**20:.0f} MB")
    assert before - after > 0.5 * 2_500 * 96_000             # most of the freed half went back
    del blocks
