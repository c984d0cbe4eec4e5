"""``cryofastar simulate``: outputs, conventions of what it writes, bad input, nothing half-written."""
from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import starfile

import cryofastar_core.io as cio
from cryofastar_core.cli.main import main
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate
from cryofastar_core.runtime.errors import InputError


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _sim(tmp_path, map_file, name="out", **kw):
    cfg = dict(out_dir=tmp_path / name, n=30, box=32, snr=float("inf"), seed=7, map_path=map_file)
    cfg.update(kw)
    return simulate(SimulateConfig(**cfg))


def test_cli_writes_relion31_star_stack_and_truth(tmp_path, tiny_map_file, tiny_map, run_cli):
    out = tmp_path / "sim"
    proc = run_cli("simulate", "--map", tiny_map_file, "--n", 25, "--box", 32, "--snr", "inf", "--ctf",
                   "--max-shift", 2, "--seed", 1, "--o", out)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == ["particles.mrcs", "particles.star", "truth.mrc"]
    blocks = starfile.read(out / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(3.0)
    assert int(optics["rlnImageSize"].iloc[0]) == 32
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnRandomSubset"):
        assert col in parts.columns, col
    assert "rlnOriginX" not in parts.columns  # 3.1 files carry Å origins only
    assert list(parts["rlnImageName"][:2]) == ["000001@particles.mrcs", "000002@particles.mrcs"]
    assert parts["rlnDefocusU"].between(5000, 30250).all() and (parts["rlnDefocusU"] >= parts["rlnDefocusV"]).all()
    assert (parts[["rlnOriginXAngst", "rlnOriginYAngst"]].abs() <= 2 * 3.0 + 1e-6).all().all()
    assert set(parts["rlnRandomSubset"]) == {1, 2}
    with mrcfile.open(out / "particles.mrcs") as m:
        assert m.data.shape == (25, 32, 32) and m.voxel_size.x == pytest.approx(3.0)
    vol, apix = cio.read_map(out / "truth.mrc")
    assert apix == pytest.approx(3.0)
    np.testing.assert_allclose(vol, tiny_map[0], atol=1e-6)  # same box and pixel size: the map as it is
    # Our own reader finds the stack from any working directory and gets the poses back.
    ps = cio.read_particles(out / "particles.star")
    assert len(ps) == 25 and ps.rotations.shape == (25, 3, 3) and ps.ctf is not None
    assert np.abs(ps.shifts).max() <= 2 + 1e-6


def test_same_seed_same_data_and_several_stacks(tmp_path, tiny_map_file):
    a = _sim(tmp_path, tiny_map_file, "a", snr=0.5, ctf=True, max_shift=2.0)
    b = _sim(tmp_path, tiny_map_file, "b", snr=0.5, ctf=True, max_shift=2.0, stack_size=12, chunk_size=5)
    assert _outputs(b.parent) == ["particles.star", "particles_000.mrcs", "particles_001.mrcs",
                                  "particles_002.mrcs", "truth.mrc"]
    pa, pb = cio.read_particles(a), cio.read_particles(b)
    np.testing.assert_allclose(pa.rotations, pb.rotations)
    assert pb.table["rlnImageName"].iloc[12] == "000001@particles_001.mrcs"
    # Chunking and stack layout change nothing: the same seed gives the same images.
    np.testing.assert_allclose(pa.read_images(np.arange(30)), pb.read_images(np.arange(30)), atol=1e-5)
    c = _sim(tmp_path, tiny_map_file, "c", snr=0.5, ctf=True, max_shift=2.0, seed=8)
    assert not np.allclose(cio.read_particles(c).rotations, pa.rotations)


def test_snr_sets_noise_variance(tmp_path, tiny_map_file):
    clean = cio.read_particles(_sim(tmp_path, tiny_map_file, "clean", n=200)).read_images(np.arange(200))
    noisy = cio.read_particles(_sim(tmp_path, tiny_map_file, "noisy", n=200, snr=0.25)).read_images(np.arange(200))
    # Same seed: same poses, so the difference is the noise; SNR = var(clean image) / var(noise).
    ratio = clean.var(axis=(1, 2)) / (noisy - clean).var(axis=(1, 2))
    assert np.median(ratio) == pytest.approx(0.25, rel=0.05)


def test_map_is_fourier_resampled_to_box(tmp_path, tiny_map_file, tiny_map):
    # Default pixel size keeps the field of view: box 16 from a 32-voxel 3 Å map is 6 Å/px.
    star = _sim(tmp_path, tiny_map_file, "crop", box=16, n=4)
    vol, apix = cio.read_map(star.parent / "truth.mrc")
    assert vol.shape == (16, 16, 16) and apix == pytest.approx(6.0)
    assert vol.sum() == pytest.approx(float(tiny_map[0].sum()) / 8, rel=1e-3)  # values kept: 8x fewer voxels
    # Same pixel size, bigger box: zero-padded around the centre.
    star = _sim(tmp_path, tiny_map_file, "pad", box=40, n=4, apix=3.0)
    vol, apix = cio.read_map(star.parent / "truth.mrc")
    assert vol.shape == (40, 40, 40) and apix == pytest.approx(3.0)
    np.testing.assert_allclose(vol[4:36, 4:36, 4:36], tiny_map[0], atol=1e-5)


def test_model_input(tmp_path):
    pdb = tmp_path / "tiny.pdb"
    lines = []
    for i, (x, y, z) in enumerate([(0, 0, 0), (3.8, 0, 0), (3.8, 3.8, 0), (3.8, 3.8, 3.8), (7.6, 3.8, 3.8)]):
        lines.append(f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00           C")
    pdb.write_text("\n".join(lines) + "\nEND\n")
    star = simulate(SimulateConfig(out_dir=tmp_path / "m", n=3, box=24, snr=float("inf"), seed=0, model_path=pdb,
                                   apix=1.5))
    vol, apix = cio.read_map(star.parent / "truth.mrc")
    assert vol.shape == (24, 24, 24) and apix == pytest.approx(1.5) and vol.max() > 0


@pytest.mark.parametrize("args, field", [
    (["--n", "0"], "--n"),
    (["--n", "-3"], "--n"),
    (["--snr", "0"], "--snr"),
    (["--snr", "-1"], "--snr"),
    (["--snr", "nan"], "--snr"),
    (["--max-shift", "-1"], "--max-shift"),
])
def test_bad_numbers_are_input_errors(tmp_path, tiny_map_file, capsys, args, field):
    base = {"--n": "5", "--snr": "1", "--max-shift": "0"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["simulate", "--map", str(tiny_map_file), "--box", "32", "--seed", "0", "--o", str(tmp_path / "o")]
    for k, v in base.items():
        argv += [k, v]
    assert main(argv) == InputError.exit_code
    err = capsys.readouterr().err
    assert field in err and "Fix:" in err
    assert _outputs(tmp_path / "o") == []


def test_missing_and_non_cubic_map(tmp_path, capsys, run_cli):
    missing = tmp_path / "nope.mrc"
    proc = run_cli("simulate", "--map", missing, "--n", 5, "--box", 32, "--snr", 1, "--seed", 0, "--o", tmp_path / "o")
    assert proc.returncode == InputError.exit_code
    assert "nope.mrc" in proc.stderr and "Traceback" not in proc.stderr
    flat = tmp_path / "flat.mrc"
    with mrcfile.new(flat) as m:
        m.set_data(np.zeros((16, 32, 32), np.float32))
        m.voxel_size = 2.0
    with pytest.raises(InputError, match="cube"):
        _sim(tmp_path, flat, "o2", n=5)
    assert _outputs(tmp_path / "o") == [] and _outputs(tmp_path / "o2") == []


def test_model_needs_apix(tmp_path):
    pdb = tmp_path / "x.pdb"
    pdb.write_text("END\n")
    with pytest.raises(InputError, match="--apix"):
        simulate(SimulateConfig(out_dir=tmp_path / "o", n=3, box=16, snr=1.0, seed=0, model_path=pdb))


def test_failure_leaves_nothing_that_looks_finished(tmp_path, tiny_map_file, monkeypatch):
    def broken_star(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cio, "new_star", broken_star)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="disk full"):
        _sim(tmp_path, tiny_map_file, "o", stack_size=10)
    # Stacks and map were complete, but nothing is moved into place without the STAR; no staging left.
    assert _outputs(out) == []


def test_rerun_replaces_previous_output(tmp_path, tiny_map_file):
    _sim(tmp_path, tiny_map_file, "o", n=10)
    star = _sim(tmp_path, tiny_map_file, "o", n=12)
    assert len(cio.read_particles(star)) == 12
    assert _outputs(star.parent) == ["particles.mrcs", "particles.star", "truth.mrc"]
    umask = os.umask(0)
    os.umask(umask)
    assert star.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not the private temp file's
