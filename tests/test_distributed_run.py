"""`cryofastar run` under torchrun (2 ranks, gloo, CPU) equals one process; resume and failures work.

Tiny untrained weights as in test_job.py: what is compared is the plumbing (sharding, gathering,
reduction, refinement shared over the ranks, rank-0 writing), which must not change any number beyond
float rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from _ranks import on_two_ranks
from cryofastar_core.geometry import rotation_angle_deg
from cryofastar_core.runtime.communicator import Communicator, PeerFailure
from cryofastar_core.io import read_particles
from cryofastar_core.job import JobConfig, run
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

REPO = Path(__file__).resolve().parents[1]
BOX = 32
# Without refinement: these particles' poses come from untrained weights, so their maps are mostly noise,
# and refinement's many arg-max choices over noise (every global pass, every half-frame registration) turn
# the other order of the ranks' sums into different results (measured: 2.4 deg median). Refinement shared
# over ranks is compared with one process on data with signal in tests/test_refine.py
# (test_two_ranks_share_the_work_and_equal_one_process).
JOB = ["--views", "16", "--candidates", "4", "--anchors", "4", "--device", "cpu", "--refine-iters", "0"]


@pytest.fixture(scope="module")
def sim_star(tmp_path_factory, tiny_map_file) -> Path:
    out = tmp_path_factory.mktemp("sim")
    return simulate(SimulateConfig(out_dir=out, n=200, box=BOX, snr=1.0, seed=3, map_path=tiny_map_file, ctf=True,
                                   max_shift=1.0))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                OMP_NUM_THREADS="1", MPLBACKEND="Agg")


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cryofastar_core.cli.run", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _args(star: Path, out: Path, weights: Path) -> list[str]:
    return ["--particles", str(star), "--o", str(out), "--weights", str(weights), *JOB]


def _compare_runs(one: Path, two: Path, project: Path) -> None:
    a, b = read_particles(one / "particles.star", project), read_particles(two / "particles.star", project)
    assert list(a.table["rlnImageName"]) == list(b.table["rlnImageName"])  # same particles, same order
    ang = rotation_angle_deg(torch.as_tensor(a.rotations), torch.as_tensor(b.rotations))
    corr = np.corrcoef(mrcfile.read(one / "map.mrc").ravel(), mrcfile.read(two / "map.mrc").ravel())[0, 1]
    print(f"2 ranks vs 1 process: rotation diff median {float(ang.median()):.1e} max {float(ang.max()):.1e} deg, "
          f"shift diff max {np.abs(b.shifts - a.shifts).max():.1e} px, map correlation 1 - {1 - corr:.1e}")
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-5)
    np.testing.assert_allclose(b.shifts, a.shifts, atol=1e-4)
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnRandomSubset"):
        np.testing.assert_allclose(b.table[col].to_numpy(float), a.table[col].to_numpy(float), atol=1e-3, err_msg=col)
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        x, y = mrcfile.read(one / name), mrcfile.read(two / name)
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, atol=1e-5 * np.abs(x).max(), rtol=1e-4, err_msg=name)


def test_two_ranks_equal_one_process_and_resume(sim_star, tiny_weights, tmp_path):
    one = tmp_path / "one"
    single = run(JobConfig(particles=sim_star, out_dir=one, weights=str(tiny_weights), views=16, candidates=4,
                           anchors=4, device="cpu", refine_iters=0))
    two = tmp_path / "two"
    proc = torchrun(_args(sim_star, two, tiny_weights), cwd=sim_star.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _compare_runs(one, two, sim_star.parent)
    rep = json.loads((two / "report.json").read_text())
    assert rep["processes"] == 2 and rep["n_particles"] == 200
    assert rep["reference"] == single.reference and rep["n_chunks"] == single.n_chunks
    assert rep["flipped_chunks"] == single.flipped_chunks
    # The same half maps give the same FSC curve and the same verdict. Not resolution_0143: on these tiny
    # untrained weights the verdict may be "failed" (then no resolution is claimed, null), and whether it
    # is depends on the install's numerics; the test is about the two runs agreeing.
    fsc_one, fsc_two = (np.loadtxt(d / "fsc.tsv", skiprows=1) for d in (one, two))
    np.testing.assert_allclose(fsc_two, fsc_one, atol=1e-3)
    assert rep["quality"]["verdict"] == single.quality["verdict"]
    assert (rep["resolution_0143"] is None) == (single.resolution_0143 is None)
    # Rank 0 alone wrote: one summary line on stdout, no staging left behind.
    assert proc.stdout.count("particles kept") == 1
    assert not list(two.glob(".cryofastar-staging-*"))

    # A rerun on complete output does nothing: same report, outputs untouched.
    stamp = {p.name: p.stat().st_mtime_ns for p in two.iterdir() if p.is_file()}
    proc = torchrun(_args(sim_star, two, tiny_weights), cwd=sim_star.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in two.iterdir() if p.is_file()} == stamp

    # Partial output: rank 0 finds the saved poses and every rank resumes from them.
    (two / "report.json").unlink()
    (two / "map.mrc").unlink()
    proc = torchrun(_args(sim_star, two, tiny_weights), cwd=sim_star.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((two / "report.json").read_text())
    assert rep["resumed_from_poses"] is True
    _compare_runs(one, two, sim_star.parent)


def test_an_error_on_one_rank_stops_every_rank(sim_star, tiny_weights, tmp_path):
    """A NaN image read by one rank only: both ranks exit non-zero (no hang), nothing looks finished."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "particles.star").write_text(sim_star.read_text())
    with mrcfile.open(sim_star.parent / "particles.mrcs") as m:
        data = m.data.copy()
    # A particle outside the reference candidates and the first pass, so that exactly one rank reads it.
    first_pass = set(np.random.default_rng(0).permutation(200)[:19].tolist())
    k = next(i for i in range(200) if i not in first_pass)
    data[k] = np.nan
    with mrcfile.new(bad / "particles.mrcs") as m:
        m.set_data(data)
    out = tmp_path / "out"
    proc = torchrun(_args(bad / "particles.star", out, tiny_weights), cwd=bad, timeout=90)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "NaN" in err and f"slice {k + 1}" in err, err[-3000:]
    assert "process rank" in err, err[-3000:]  # the other rank was told, and exited too
    assert not (out / "report.json").exists() and not (out / "map.mrc").exists()


def _collectives_on_rank(comm: Communicator) -> dict:
    rank = comm.rank
    out = {"gather": comm.gather(lambda: rank * 10)}
    out["main"] = comm.on_main(lambda: "from rank 0")
    t = torch.full((3,), float(rank + 1), dtype=torch.complex64)
    comm.reduce_sum_([t], dst=0)
    out["reduced"] = t.real.tolist()

    def fail_on_1():
        if rank == 1:
            raise ValueError("boom on rank 1")
        return rank

    try:
        comm.gather(fail_on_1)
    except PeerFailure as exc:
        out["peer"] = (exc.rank, exc.exit_code, str(exc))
    except ValueError as exc:
        out["own"] = str(exc)
    return out


def test_communicator_collectives_and_failure_agreement():
    r0, r1 = on_two_ranks(_collectives_on_rank)
    assert r0["gather"] == r1["gather"] == [0, 10]
    assert r0["main"] == r1["main"] == "from rank 0"
    assert r0["reduced"] == [3.0, 3.0, 3.0]  # summed into rank 0 (other ranks' buffers are scratch)
    assert r1["own"] == "boom on rank 1"
    assert r0["peer"][0] == 1 and r0["peer"][1] == 1 and "boom on rank 1" in r0["peer"][2]
