"""RELION STAR reading and writing: 3.1 with two optics groups, 3.0 legacy, conversion, RELION reading ours."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import CONFIDENCE_LABEL, new_star, read_particles, write_particles_star, write_stack
from _io_fixtures import relion30_star, relion31_project



def scipy_R(eulers: np.ndarray) -> np.ndarray:
    return Rotation.from_euler("ZYZ", eulers, degrees=True).as_matrix()


def test_relion31_two_optics_groups_read(tmp_path, monkeypatch):
    star, ref = relion31_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    n = 2 * ref["n_per_group"]
    assert p.source_format == "relion31" and len(p) == n and p.box == 16
    np.testing.assert_allclose(p.apix, ref["apix"])
    assert [f.name for f in p.image_files] == ["a.mrcs", "b.mrcs"]
    np.testing.assert_array_equal(p.slice_index, np.tile(np.arange(ref["n_per_group"]), 2))
    np.testing.assert_allclose(p.rotations, scipy_R(ref["eulers"]), atol=1e-6)
    np.testing.assert_allclose(p.shifts, ref["origin_angst"] / ref["apix"][:, None], atol=1e-9)
    np.testing.assert_allclose(p.ctf["voltage"], np.where(ref["group"] == 1, 300.0, 200.0))
    np.testing.assert_allclose(p.ctf["amplitude_contrast"], np.where(ref["group"] == 1, 0.1, 0.07))
    np.testing.assert_allclose(p.ctf["defocus_u"], ref["defocus_u"])
    np.testing.assert_allclose(p.ctf["bfactor"], 5.0 * np.arange(n))
    np.testing.assert_allclose(p.ctf["scale"], 1.0 - 0.01 * np.arange(n))
    assert p.half_set is None and (p.sign == 1).all()
    # Images come back in the order asked for, from the right stack and slice.
    order = np.array([5, 0, 7, 2])
    imgs = p.read_images(order)
    stacks = ref["stacks"]
    expected = [stacks["Extract/job002/b.mrcs"][1], stacks["Extract/job002/a.mrcs"][0],
                stacks["Extract/job002/b.mrcs"][3], stacks["Extract/job002/a.mrcs"][2]]
    np.testing.assert_array_equal(imgs, np.stack(expected))
    ctf = p.ctf_params(np.array([1, 6]))
    assert len(ctf) == 2 and float(ctf.voltage[1]) == 200.0


def test_relion31_round_trip_keeps_columns_and_optics(tmp_path, monkeypatch):
    star, ref = relion31_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    n = len(p)
    R_new = Rotation.random(n, random_state=5).as_matrix()
    shifts_new = np.random.default_rng(6).normal(0, 2, (n, 2))
    half = np.array([1, 2] * (n // 2))
    conf = np.linspace(0.1, 0.9, n)
    out = tmp_path / "External/job004/particles.star"
    out.parent.mkdir(parents=True)
    write_particles_star(p, out, rotations=R_new, shifts=shifts_new, half_set=half,
                         extra_columns={CONFIDENCE_LABEL: conf})
    blocks = starfile.read(out, always_dict=True)
    before = starfile.read(star, always_dict=True)
    pd.testing.assert_frame_equal(blocks["optics"], before["optics"])
    t = blocks["particles"]
    assert list(t.columns) == ref["columns"] + ["rlnRandomSubset", CONFIDENCE_LABEL]
    unchanged = [c for c in ref["columns"] if not c.startswith(("rlnAngle", "rlnOrigin"))]
    pd.testing.assert_frame_equal(t[unchanged], before["particles"][unchanged])
    q = read_particles(out)
    np.testing.assert_allclose(q.rotations, R_new, atol=1e-5)
    np.testing.assert_allclose(q.shifts, shifts_new, atol=1e-5)
    np.testing.assert_array_equal(q.half_set, half)
    np.testing.assert_allclose(t[CONFIDENCE_LABEL], conf, atol=1e-6)
    # keep: rows and the optics groups they use
    write_particles_star(p, out, keep=np.arange(n) < 3)
    kept = starfile.read(out, always_dict=True)
    assert len(kept["particles"]) == 3 and list(kept["optics"]["rlnOpticsGroup"]) == [1]
    assert list(kept["particles"]["rlnImageName"]) == list(before["particles"]["rlnImageName"][:3])


def test_relion30_legacy_read(tmp_path, monkeypatch):
    star, ref = relion30_star(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    assert p.source_format == "relion30" and p.optics is None
    np.testing.assert_allclose(p.apix, 2.5)  # 10000 * 2.5 / 10000
    np.testing.assert_allclose(p.shifts, ref["origin_px"])
    np.testing.assert_allclose(p.rotations, scipy_R(ref["eulers"]), atol=1e-6)
    np.testing.assert_array_equal(p.read_images([4, 1]), ref["data"][[4, 1]])
    star2, _ = relion30_star(tmp_path / "b", pixel_columns="apix")
    monkeypatch.chdir(tmp_path / "b")
    np.testing.assert_allclose(read_particles(star2).apix, 2.5)


def test_relion30_written_as_relion31(tmp_path, monkeypatch):
    star, ref = relion30_star(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    out = tmp_path / "out31.star"
    write_particles_star(p, out)
    blocks = starfile.read(out, always_dict=True)
    opt, t = blocks["optics"], blocks["particles"]
    assert len(opt) == 1 and float(opt["rlnImagePixelSize"][0]) == 2.5 and int(opt["rlnImageSize"][0]) == 16
    assert float(opt["rlnVoltage"][0]) == 300.0
    assert "rlnOriginX" not in t.columns and "rlnVoltage" not in t.columns
    np.testing.assert_allclose(t["rlnOriginXAngst"], ref["origin_px"][:, 0] * 2.5, atol=1e-6)
    q = read_particles(out)
    assert q.source_format == "relion31"
    np.testing.assert_allclose(q.shifts, p.shifts, atol=1e-6)
    np.testing.assert_allclose(q.rotations, p.rotations, atol=1e-6)
    np.testing.assert_allclose(q.ctf["defocus_u"], p.ctf["defocus_u"])


def test_path_resolution_falls_back_to_star_folder(tmp_path, monkeypatch):
    star, _ = relion31_project(tmp_path / "proj")
    # Stacks relative to the project folder: found from the project folder...
    p = read_particles(star, project_dir=tmp_path / "proj")
    assert p.image_files[0] == (tmp_path / "proj/Extract/job002/a.mrcs").resolve()
    # ...and, when the STAR travels with its stacks, from the STAR's own folder.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "proj/Extract", moved / "Extract")
    shutil.copy(star, moved / "particles.star")
    monkeypatch.chdir(tmp_path)
    p2 = read_particles(moved / "particles.star")
    assert p2.image_files[1] == (moved / "Extract/job002/b.mrcs").resolve()
    # Default first place: the working directory (RELION runs from the project folder).
    monkeypatch.chdir(tmp_path / "proj")
    assert read_particles(star).image_files[0] == (tmp_path / "proj/Extract/job002/a.mrcs").resolve()


def test_path_resolution_from_elsewhere_and_the_error_naming_every_place(tmp_path, monkeypatch):
    star, _ = relion31_project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # a job's STAR (Select/job003/particles.star) names images from the project folder, two levels up
    assert read_particles(star).image_files[0] == (tmp_path / "proj/Extract/job002/a.mrcs").resolve()
    (tmp_path / "proj/Extract/job002/a.mrcs").unlink()
    with pytest.raises(InputError) as e:
        read_particles(star)
    msg = str(e.value)
    assert str(elsewhere / "Extract/job002/a.mrcs") in msg
    assert str(tmp_path / "proj/Select/job003/Extract/job002/a.mrcs") in msg
    assert str(tmp_path / "proj/Extract/job002/a.mrcs") in msg
    assert "rlnImageName" in msg


def test_new_star_and_stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n, box = 6, 16
    imgs = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    write_stack(tmp_path / "sim.mrcs", imgs, 1.2)
    R = Rotation.random(n, random_state=1).as_matrix()
    sh = np.random.default_rng(2).normal(size=(n, 2))
    ctf = {"defocus_u": np.full(n, 15000.0), "defocus_v": np.full(n, 14000.0), "defocus_angle": np.full(n, 20.0)}
    new_star(tmp_path / "sim.star", [f"{i + 1:06d}@sim.mrcs" for i in range(n)], 1.2, box, 300, 2.7, 0.1, ctf, R, sh)
    p = read_particles(tmp_path / "sim.star")
    np.testing.assert_array_equal(p.read_images(np.arange(n)), imgs)
    np.testing.assert_allclose(p.rotations, R, atol=1e-5)
    np.testing.assert_allclose(p.shifts, sh, atol=1e-5)
    np.testing.assert_allclose(p.ctf["defocus_v"], 14000.0)
    np.testing.assert_allclose(p.ctf["phase_shift"], 0.0)
    assert p.apix[0] == pytest.approx(1.2)


@pytest.mark.relion
def test_relion_reads_our_star_back(relion, tmp_path, monkeypatch):
    """relion_star_handler (RELION 3.1) reads what we write without changing a value, extra label included."""
    if shutil.which("relion_star_handler") is None:
        pytest.fail("relion_star_handler not on PATH: install RELION 3.1 (scripts/test.sh does this)", pytrace=False)
    star, _ = relion31_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    n = len(p)
    ours = tmp_path / "ours.star"
    write_particles_star(p, ours, rotations=Rotation.random(n, random_state=3).as_matrix(),
                         shifts=np.random.default_rng(4).normal(size=(n, 2)), half_set=np.array([1, 2] * (n // 2)),
                         extra_columns={CONFIDENCE_LABEL: np.linspace(0, 1, n)})
    res = subprocess.run(["relion_star_handler", "--i", "ours.star", "--o", "copy.star"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "unknown label" not in res.stdout + res.stderr  # the confidence label is one RELION knows
    a, b = starfile.read(ours, always_dict=True), starfile.read("copy.star", always_dict=True)
    for block in ("optics", "particles"):
        assert list(a[block].columns) == list(b[block].columns)
        for c in a[block].columns:
            if a[block][c].dtype.kind in "fi":
                np.testing.assert_allclose(b[block][c].to_numpy(float), a[block][c].to_numpy(float), atol=1e-5)
            else:
                assert list(a[block][c].astype(str)) == list(b[block][c].astype(str))
    np.testing.assert_allclose(read_particles("copy.star").rotations, read_particles(ours).rotations, atol=1e-6)
