"""CryoSPARC .cs reading and writing through cryosparc-tools' Dataset."""
from __future__ import annotations

import numpy as np
import starfile
from cryosparc.dataset import Dataset
from scipy.spatial.transform import Rotation

from cryofastar_core.io import read_particles, write_particles_cs, write_particles_star
from _io_fixtures import make_stack, relion31_project

EXPECTED_DTYPES = {"alignments3D/pose": ("<f4", (3,)), "alignments3D/shift": ("<f4", (2,)),
                   "alignments3D/psize_A": ("<f4", ()), "alignments3D/split": ("<u4", ()),
                   "alignments3D/class": ("<u4", ()), "alignments3D/class_posterior": ("<f4", ()),
                   "alignments3D/error": ("<f4", ()), "alignments3D/weight": ("<f4", ()),
                   "blob/idx": ("<u4", ()), "blob/shape": ("<u4", (2,)), "blob/psize_A": ("<f4", ()),
                   "ctf/df1_A": ("<f4", ()), "ctf/exp_group_id": ("<u4", ())}


def _cryosparc_project(root, n=6, box=16):
    """A CryoSPARC-like project: stacks under J2/, particles .cs in J5/ with '>' path marks."""
    data = make_stack(root / "J2/imported/s.mrcs", n, box, seed=11, apix=1.7)
    rng = np.random.default_rng(12)
    ds = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/accel_kv", "<f4"),
                              ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
                              ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
                              ("ctf/exp_group_id", "<u4"), ("alignments3D/pose", "<f4", (3,)),
                              ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
                              ("alignments3D/split", "<u4"), ("location/micrograph_path", "O")])
    ds["blob/path"] = np.array([">J2/imported/s.mrcs"] * n, dtype=object)
    ds["blob/idx"] = np.arange(n)[::-1].astype(np.uint32)
    ds["blob/shape"] = box
    ds["blob/psize_A"] = 1.7
    ds["blob/sign"] = -1.0
    ds["ctf/accel_kv"], ds["ctf/cs_mm"], ds["ctf/amp_contrast"] = 300.0, 2.7, 0.1
    ds["ctf/df1_A"] = 15000 + 10 * np.arange(n)
    ds["ctf/df2_A"] = 14000 + 10 * np.arange(n)
    ds["ctf/df_angle_rad"] = 0.5
    ds["ctf/exp_group_id"] = 1
    ds["alignments3D/pose"] = rng.normal(0, 1, (n, 3)).astype(np.float32)
    ds["alignments3D/shift"] = rng.normal(0, 2, (n, 2)).astype(np.float32)
    ds["alignments3D/psize_A"] = 3.4  # shifts expressed at a coarser pixel
    ds["alignments3D/split"] = np.arange(n) % 2
    ds["location/micrograph_path"] = np.array([">J1/mic.mrc"] * n, dtype=object)
    (root / "J5").mkdir(parents=True)
    ds.save(root / "J5/particles.cs")
    return root / "J5/particles.cs", ds, data


def test_read_cs(tmp_path, monkeypatch):
    cs, ds, data = _cryosparc_project(tmp_path / "P1")
    monkeypatch.chdir(tmp_path)  # not the project: found through the .cs file's project folder
    p = read_particles(cs)
    assert p.source_format == "cryosparc" and p.image_files == [(tmp_path / "P1/J2/imported/s.mrcs").resolve()]
    np.testing.assert_array_equal(p.read_images([0, 5]), data[[5, 0]])
    np.testing.assert_allclose(p.rotations, Rotation.from_rotvec(ds["alignments3D/pose"]).as_matrix(), atol=1e-6)
    np.testing.assert_allclose(p.shifts, ds["alignments3D/shift"] * 2.0, rtol=1e-6)
    np.testing.assert_allclose(p.ctf["defocus_angle"], np.rad2deg(0.5), rtol=1e-6)
    np.testing.assert_array_equal(p.half_set, np.arange(6) % 2 + 1)
    np.testing.assert_allclose(p.sign, -1.0)


def test_write_cs_passthrough_and_dtypes(tmp_path, monkeypatch):
    cs, ds, _ = _cryosparc_project(tmp_path / "P1")
    p = read_particles(cs)
    n = len(p)
    R = Rotation.random(n, random_state=1).as_matrix()
    sh = np.random.default_rng(2).normal(size=(n, 2))
    out = tmp_path / "P1/J6/out.cs"
    out.parent.mkdir()
    write_particles_cs(p, out, R, sh, half_set=np.array([2, 1, 2, 1, 2, 1]),
                       extra={"alignments3D/error": np.arange(n, dtype=np.float32)})
    back = Dataset.load(out)
    descr = {d[0]: (d[1], tuple(d[2]) if len(d) > 2 else ()) for d in back.descr()}
    for name, want in EXPECTED_DTYPES.items():
        assert descr[name] == want, name
    np.testing.assert_array_equal(back["uid"], ds["uid"])  # passthrough keeps uids (CryoSPARC joins on them)
    assert list(back["location/micrograph_path"]) == list(ds["location/micrograph_path"])
    np.testing.assert_allclose(Rotation.from_rotvec(back["alignments3D/pose"]).as_matrix(), R, atol=1e-5)
    np.testing.assert_allclose(back["alignments3D/psize_A"], 1.7)
    np.testing.assert_array_equal(back["alignments3D/split"], [1, 0, 1, 0, 1, 0])
    np.testing.assert_allclose(back["alignments3D/error"], np.arange(n))
    q = read_particles(out, project_dir=tmp_path / "P1")
    np.testing.assert_allclose(q.shifts, sh, atol=1e-5)
    np.testing.assert_allclose(q.rotations, R, atol=1e-5)
    write_particles_cs(p, out, R, sh, keep=np.array([4, 1]))
    np.testing.assert_array_equal(Dataset.load(out)["uid"], ds["uid"][[4, 1]])


def test_star_to_cs_and_cs_to_star(tmp_path, monkeypatch):
    star, ref = relion31_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    p = read_particles(star)
    n = len(p)
    write_particles_cs(p, tmp_path / "from_star.cs", p.rotations, p.shifts)
    back = Dataset.load(tmp_path / "from_star.cs")
    assert back["blob/path"][0] == "Extract/job002/a.mrcs" and int(back["blob/idx"][1]) == 1
    q = read_particles(tmp_path / "from_star.cs")
    np.testing.assert_allclose(q.rotations, p.rotations, atol=1e-5)
    np.testing.assert_allclose(q.shifts, p.shifts, atol=1e-5)
    np.testing.assert_allclose(q.ctf["amplitude_contrast"], p.ctf["amplitude_contrast"], rtol=1e-6)
    np.testing.assert_allclose(q.apix, p.apix)
    np.testing.assert_array_equal(q.read_images(np.arange(n)), p.read_images(np.arange(n)))
    # .cs -> STAR: image names, two optics groups, Å origins
    write_particles_star(q, tmp_path / "from_cs.star")
    blocks = starfile.read(tmp_path / "from_cs.star", always_dict=True)
    assert list(blocks["particles"]["rlnImageName"]) == list(p.table["rlnImageName"])
    assert sorted(blocks["optics"]["rlnImagePixelSize"]) == [1.5, 2.0]
    r = read_particles(tmp_path / "from_cs.star")
    np.testing.assert_allclose(r.shifts, p.shifts, atol=1e-4)
    np.testing.assert_allclose(r.ctf["voltage"], p.ctf["voltage"])
    np.testing.assert_allclose(r.rotations, p.rotations, atol=1e-5)
