"""Scratch copies of derived images (cryofastar_core/io/scratch.py): each image is made once, read back exactly,
in any order and with repeats; a box the disk cannot hold is made on every read; closing removes the files."""
from __future__ import annotations

import numpy as np

from cryofastar_core.io import scratch as scratch_module
from cryofastar_core.io.scratch import ImageScratch

N, BOX = 50, 6


def _maker(calls: list):
    def make(idx: np.ndarray) -> np.ndarray:
        calls.append(np.asarray(idx).copy())
        return np.stack([np.full((BOX, BOX), i + 0.25, np.float32) + np.eye(BOX, dtype=np.float32) for i in idx])
    return make


def test_images_are_made_once_and_read_back_exactly(tmp_path):
    calls: list = []
    sc = ImageScratch(tmp_path / "scratch", N, tag="rank0_")
    make = _maker(calls)
    first = sc.read(np.array([7, 3, 4, 5, 3]), BOX, make)              # a repeat, out of order
    assert first.shape == (5, BOX, BOX) and np.array_equal(first, make(np.array([7, 3, 4, 5, 3])))
    calls.clear()
    again = sc.read(np.array([5, 3, 9, 4, 7]), BOX, make)              # 9 is new, the others are kept
    assert [c.tolist() for c in calls] == [[9]]
    assert np.array_equal(again, make(np.array([5, 3, 9, 4, 7])))
    assert (tmp_path / "scratch" / f"rank0_b{BOX}.f32").is_file()
    sc.close()
    assert not (tmp_path / "scratch").exists()


def test_a_box_the_disk_cannot_hold_is_made_on_every_read(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch_module, "KEEP_FREE", 0.0)
    calls: list = []
    sc = ImageScratch(tmp_path / "scratch", N)
    for _ in range(2):
        assert np.array_equal(sc.read(np.array([1, 2]), BOX, _maker(calls)), _maker([])(np.array([1, 2])))
    assert len(calls) == 2 and not list((tmp_path / "scratch").iterdir())
    sc.close()
