"""MRC stacks and maps: lazy chunked reading with bounded memory, modes, maps, atomic writes."""
from __future__ import annotations

import os
import pickle
import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import atomic_output, new_star, read_map, read_particles, write_map, write_stack
from _io_fixtures import make_stack


def _star_for(tmp_path, stack_name: str, n: int, box: int, apix: float = 1.0):
    new_star(tmp_path / "p.star", [f"{i + 1:06d}@{stack_name}" for i in range(n)], apix, box, 300, 2.7, 0.1,
             None, None, None)
    return read_particles(tmp_path / "p.star", project_dir=tmp_path)


def test_chunked_reading_is_lazy(tmp_path):
    """A 32 MiB stack streams in chunks; peak numpy allocation is a few chunks, far below the stack size."""
    n, box, chunk = 2048, 64, 32
    data = np.arange(n, dtype=np.float32)[:, None, None] + np.zeros((1, box, box), np.float32)
    write_stack(tmp_path / "big.mrcs", data, 1.0)
    del data
    stack_bytes = n * box * box * 4
    p = _star_for(tmp_path, "big.mrcs", n, box)
    order = np.random.default_rng(0).permutation(n)
    rss_before = _resident_bytes()
    tracemalloc.start()
    seen = np.zeros(n, dtype=bool)
    for idx, imgs in p.iter_chunks(chunk, order):
        assert imgs.shape == (len(idx), box, box) and imgs.dtype == np.float32
        assert (imgs[:, 0, 0] == idx).all()  # right slice, right order
        seen[idx] = True
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen.all()
    chunk_bytes = chunk * box * box * 4
    assert peak < 6 * chunk_bytes and peak < stack_bytes / 10, f"peak {peak} B; chunk {chunk_bytes} B, stack {stack_bytes} B"
    # Nothing of the stack stays resident after it was read (a memory map would keep every page read).
    grown = _resident_bytes() - rss_before
    assert grown < stack_bytes / 4, f"resident memory grew by {grown} B reading a {stack_bytes} B stack"


def _resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_few_files_open_at_once(tmp_path):
    for k in range(12):
        make_stack(tmp_path / f"s{k}.mrcs", 2, 8, seed=k)
    new_star(tmp_path / "p.star", [f"{i % 2 + 1:06d}@s{i // 2}.mrcs" for i in range(24)], 1.0, 8, 300, 2.7, 0.1,
             None, None, None)
    p = read_particles(tmp_path / "p.star", project_dir=tmp_path)
    for _, _ in p.iter_chunks(5):
        assert len(p._reader._open) <= p._reader.max_open
    q = pickle.loads(pickle.dumps(p))  # picklable for DataLoader workers
    np.testing.assert_array_equal(q.read_images([23]), p.read_images([23]))


@pytest.mark.parametrize("dtype", [np.float16, np.int16, np.int8, np.uint16])
def test_stack_modes(tmp_path, dtype):
    data = make_stack(tmp_path / "m.mrcs", 3, 8, dtype=np.float32)
    data = np.clip(data, -100, 100).astype(dtype)
    with mrcfile.new(tmp_path / "m.mrcs", overwrite=True) as m:
        m.set_data(data)
    p = _star_for(tmp_path, "m.mrcs", 3, 8)
    out = p.read_images([2, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data[[2, 0]].astype(np.float32))


def test_truncated_stack(tmp_path):
    make_stack(tmp_path / "t.mrcs", 4, 8)
    raw = (tmp_path / "t.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="truncated"):
        _star_for(tmp_path, "t.mrcs", 2, 8)


def test_map_round_trip(tmp_path):
    v = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    write_map(tmp_path / "m.mrc", v, 1.7)
    back, apix = read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, v)
    assert apix == pytest.approx(1.7)
    with mrcfile.open(tmp_path / "m.mrc") as m:
        assert tuple(m.header.origin.tolist()) == (0.0, 0.0, 0.0)
    with mrcfile.new(tmp_path / "bad.mrc") as m:
        m.set_data(np.zeros((4, 6, 6), np.float32))
    with pytest.raises(InputError, match="cube"):
        read_map(tmp_path / "bad.mrc")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.star"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["out.star"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
