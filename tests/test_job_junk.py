"""The job with junk in its input: pure-noise images are found in refinement's global passes, left out of
the maps, written to junk.star with their score, counted in report.json and the verdict; --keep-junk
keeps them in (and a large kept fraction is not "ok")."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryofastar_core.io import read_particles
from cryofastar_core.job import JobConfig, run
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

N, N_JUNK, BOX = 300, 60, 32


@pytest.fixture(scope="module")
def junk_star(tmp_path_factory, tiny_map_file) -> tuple[Path, set[str]]:
    """``N`` simulated particles (SNR 1, CTF) of which ``N_JUNK`` images are replaced by noise of the same
    variance; returns the STAR file and the image names of the noise."""
    out = tmp_path_factory.mktemp("junk")
    star = simulate(SimulateConfig(out_dir=out, n=N, box=BOX, snr=1.0, seed=5, map_path=tiny_map_file, ctf=True,
                                   max_shift=1.0))
    stack = out / "particles.mrcs"
    with mrcfile.open(stack, mode="r+") as m:
        data = m.data.copy()
        rng = np.random.default_rng(6)
        noise = rng.choice(N, N_JUNK, replace=False)
        data[noise] = rng.normal(0, data.std(), (N_JUNK, BOX, BOX)).astype(np.float32)
        m.data[:] = data
    names = list(starfile.read(star, always_dict=True)["particles"]["rlnImageName"])
    return star, {names[i] for i in noise}


def _run(star: Path, out: Path, weights: Path, **kw):
    return run(JobConfig(particles=star, out_dir=out, weights=str(weights), views=16, candidates=3, anchors=4,
                         device="cpu", refine_iters=1, **kw))


def test_noise_images_are_set_apart_and_reported(junk_star, tiny_weights, tmp_path):
    star, noise = junk_star
    out = tmp_path / "job"
    report = _run(star, out, tiny_weights)
    data = json.loads((out / "report.json").read_text())
    flagged = set(read_particles(out / "junk.star", star.parent).table["rlnImageName"])
    kept = set(read_particles(out / "particles.star", star.parent).table["rlnImageName"])
    print(f"junk.star: {len(flagged & noise)}/{N_JUNK} noise images, {len(flagged - noise)} good ones")
    assert len(flagged & noise) >= 0.9 * N_JUNK and len(flagged - noise) <= 0.02 * (N - N_JUNK)
    assert not flagged & kept and len(flagged | kept) == N and report.n_kept == len(kept)
    assert data["junk"]["n_flagged"] == len(flagged) and data["junk"]["in_maps"] is False
    assert data["junk"]["file"] == "junk.star" and {"junk.star", "junk.png"} <= set(data["outputs"])
    assert any("no evidence for any pose (junk): left out of the maps" in r for r in data["quality"]["reasons"])
    # Every particle carries its evidence score under a label RELION knows; the junk's are the lowest.
    scores = starfile.read(out / "junk.star", always_dict=True)["particles"]["rlnParticleSelectZScore"]
    good = starfile.read(out / "particles.star", always_dict=True)["particles"]["rlnParticleSelectZScore"]
    assert float(scores.max()) < float(np.median(good))


def test_keep_junk_keeps_it_in_the_maps_and_doubts_them(junk_star, tiny_weights, tmp_path):
    star, noise = junk_star
    out = tmp_path / "kept"
    report = _run(star, out, tiny_weights, keep_junk=True)
    data = json.loads((out / "report.json").read_text())
    assert not (out / "junk.star").exists() and report.n_kept == N
    assert data["junk"]["in_maps"] is True and data["junk"]["n_flagged"] >= 0.9 * N_JUNK
    # 20 % of the maps' particles without evidence: never "ok".
    assert data["quality"]["verdict"] != "ok"
    assert any("kept in the maps (--keep-junk)" in r for r in data["quality"]["reasons"])
    shutil.rmtree(out)
