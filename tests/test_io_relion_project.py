"""Reading what the real relion_project (RELION 3.1.3) writes, including its pixel-origin hybrid."""
from __future__ import annotations

import logging
import os
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryofastar_core.io import read_particles, write_particles_star

pytestmark = pytest.mark.relion  # real RELION 3.1 binaries; the conftest `relion` fixture fails if they are missing
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _map(path, n=20):
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    v = np.exp(-((x - 3) ** 2 + y ** 2 + (z + 2) ** 2) / 6) + 0.6 * np.exp(-((x + 4) ** 2 + (y - 3) ** 2 + z ** 2) / 3)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(v.astype(np.float32))
        m.voxel_size = 2.0


def _project(cwd, *args):
    res = subprocess.run(["relion_project", "--i", "map.mrc", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr


def _cc(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_relion_project_uniform_hybrid_output(relion, tmp_path, monkeypatch, caplog):
    """--nr_uniform --sigma_offset writes data_optics + random *pixel* rlnOriginX/Y but never shifts the images.

    We read it as RELION 3.1 does (origins 0, with a warning) and check that against the images.
    """
    _map(tmp_path / "map.mrc")
    _project(tmp_path, "--o", "uni", "--nr_uniform", "8", "--angpix", "2", "--sigma_offset", "3")
    table = starfile.read(tmp_path / "uni.star", always_dict=True)
    assert "optics" in table and "rlnOriginX" in table["particles"] and "rlnOriginXAngst" not in table["particles"]
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        p = read_particles("uni.star")
    assert "relion_project" in caplog.text
    assert len(p) == 8 and p.box == 20 and p.ctf is None and (p.shifts == 0).all()
    t = table["particles"]
    eul = t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_allclose(p.rotations, Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix(), atol=1e-6)
    # Particle 0 is the unshifted projection at its angles, not the one shifted by its pixel origin.
    r = t.iloc[0]
    angles = ["--rot", str(r.rlnAngleRot), "--tilt", str(r.rlnAngleTilt), "--psi", str(r.rlnAnglePsi)]
    _project(tmp_path, "--o", "p0.mrc", "--angpix", "2", *angles)
    _project(tmp_path, "--o", "p1.mrc", "--angpix", "2", *angles, "--xoff", str(r.rlnOriginX), "--yoff", str(r.rlnOriginY))
    img = p.read_images([0])[0]
    cc0, cc1 = _cc(img, mrcfile.read(tmp_path / "p0.mrc")), _cc(img, mrcfile.read(tmp_path / "p1.mrc"))
    assert cc0 > 0.9999 and cc1 < cc0 - 1e-3
    # Written back as a clean 3.1 file: Å origins only.
    write_particles_star(p, tmp_path / "clean.star")
    clean = starfile.read(tmp_path / "clean.star", always_dict=True)["particles"]
    assert "rlnOriginX" not in clean and (clean["rlnOriginXAngst"] == 0).all()


def test_relion_project_ang_output_with_ctf_and_shifts(relion, tmp_path, monkeypatch):
    """--ang with a 3.1 STAR: output keeps Å origins and CTF; our reader recovers them."""
    _map(tmp_path / "map.mrc")
    n = 6
    eul = np.stack([np.linspace(0, 300, n), np.linspace(20, 160, n), np.linspace(10, 350, n)], -1)
    origin = np.stack([np.linspace(-4, 4, n), np.linspace(3, -3, n)], -1)
    lines = ["data_optics", "loop_", "_rlnOpticsGroup", "_rlnOpticsGroupName", "_rlnVoltage", "_rlnSphericalAberration",
             "_rlnAmplitudeContrast", "_rlnImagePixelSize", "_rlnImageSize", "_rlnImageDimensionality",
             "1 og1 300 2.7 0.1 2.0 20 2", "", "data_particles", "loop_", "_rlnAngleRot", "_rlnAngleTilt",
             "_rlnAnglePsi", "_rlnOriginXAngst", "_rlnOriginYAngst", "_rlnDefocusU", "_rlnDefocusV",
             "_rlnDefocusAngle", "_rlnOpticsGroup", "_rlnImageName"]
    lines += [f"{e[0]} {e[1]} {e[2]} {o[0]} {o[1]} {9000 + 100 * i} {8800 + 100 * i} 30 1 {i + 1:06d}@none.mrcs"
              for i, (e, o) in enumerate(zip(eul, origin))]
    (tmp_path / "ang.star").write_text("\n".join(lines) + "\n")
    _project(tmp_path, "--o", "sim", "--ang", "ang.star", "--ctf")
    monkeypatch.chdir(tmp_path)
    p = read_particles("sim.star")
    np.testing.assert_allclose(p.shifts, origin / 2.0, atol=1e-5)
    np.testing.assert_allclose(p.ctf["defocus_u"], 9000 + 100 * np.arange(n), atol=1e-3)
    np.testing.assert_allclose(p.rotations, Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix(), atol=1e-6)
    imgs = p.read_images(np.arange(n))
    assert imgs.shape == (n, 20, 20) and np.isfinite(imgs).all() and imgs.std() > 0
