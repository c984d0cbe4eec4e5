"""``cryofastar reconstruct``: a noiseless simulated set comes back as the truth; half sets, sign, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cryofastar_core.io as cio
import cryofastar_core.reconstruct.from_particles as from_particles
from cryofastar_core.cli.main import main
from cryofastar_core.reconstruct.from_particles import ReconstructConfig, reconstruct_particles as reconstruct
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate
from cryofastar_core.reconstruct import fsc

OUTPUTS = ["fsc.png", "fsc.tsv", "half1.mrc", "half2.mrc", "map.mrc"]


@pytest.fixture(scope="module")
def noiseless_set(tmp_path_factory, tiny_map_file):
    """600 noiseless particles with CTF and shifts, box 32 (module-scoped: simulated once)."""
    out = tmp_path_factory.mktemp("sim")
    return simulate(SimulateConfig(out_dir=out, n=600, box=32, snr=float("inf"), seed=3, map_path=tiny_map_file,
                                   ctf=True, max_shift=3.0))


def _listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cli_reconstructs_truth(tmp_path, noiseless_set, run_cli):
    out = tmp_path / "rec"
    proc = run_cli("reconstruct", "--particles", noiseless_set, "--o", out, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert "Gold-standard resolution (half-map FSC = 0.143)" in proc.stdout
    assert _listing(out) == OUTPUTS
    truth, _ = cio.read_map(noiseless_set.parent / "truth.mrc")
    vol, apix = cio.read_map(out / "map.mrc")
    assert apix == pytest.approx(3.0)
    _, c = fsc(torch.from_numpy(vol), torch.from_numpy(truth))
    assert c[1:13].min() > 0.95, c  # up to 0.75 Nyquist
    # The half-map FSC table: shells 0..16, frequency in 1/Å, resolution in Å.
    rows = [line.split("\t") for line in (out / "fsc.tsv").read_text().splitlines()]
    assert rows[0] == ["shell", "frequency_1_per_A", "resolution_A", "fsc"] and len(rows) == 18
    assert float(rows[-1][1]) == pytest.approx(0.5 / 3.0, rel=1e-4) and float(rows[-1][2]) == pytest.approx(6.0)
    assert rows[1][2] == "inf" and rows[2][2] == "96.0000" and float(rows[5][3]) > 0.99


def test_half_sets_from_star_and_no_ctf_is_worse(tmp_path, noiseless_set):
    res = reconstruct(ReconstructConfig(particles=noiseless_set, out_dir=tmp_path / "a", threads=1))
    ps = cio.read_particles(noiseless_set)
    # Half 1 = exactly the rlnRandomSubset == 1 particles.
    from cryofastar_core.reconstruct import reconstruct as bp_reconstruct
    idx = np.nonzero(ps.half_set == 1)[0]
    ref = bp_reconstruct(torch.from_numpy(ps.read_images(idx)), torch.from_numpy(ps.rotations[idx]).float(),
                         torch.from_numpy(ps.shifts[idx]).float(), ps.ctf_params(idx), apix=3.0)
    half1, _ = cio.read_map(tmp_path / "a" / "half1.mrc")
    np.testing.assert_allclose(half1, ref.numpy(), atol=1e-4 * float(np.abs(ref.numpy()).max()))
    assert res.resolution_0143 == pytest.approx(6.0)  # noiseless: above 0.143 up to Nyquist
    # Ignoring the CTF of CTF-modulated images must hurt (the CTF branch is really used).
    reconstruct(ReconstructConfig(particles=noiseless_set, out_dir=tmp_path / "b", ctf=False, threads=1))
    truth = torch.from_numpy(cio.read_map(noiseless_set.parent / "truth.mrc")[0])
    _, c_ctf = fsc(torch.from_numpy(cio.read_map(tmp_path / "a" / "map.mrc")[0]), truth)
    _, c_no = fsc(torch.from_numpy(cio.read_map(tmp_path / "b" / "map.mrc")[0]), truth)
    assert c_no[1:13].mean() < c_ctf[1:13].mean() - 0.1


def test_random_split_is_fixed_when_the_file_has_none(tmp_path, noiseless_set):
    ps = cio.read_particles(noiseless_set)
    star = tmp_path / "nosplit.star"
    cio.new_star(star, [f"{i + 1:06d}@{noiseless_set.parent / 'particles.mrcs'}" for i in range(len(ps))], 3.0, 32,
                 300.0, 2.7, 0.1, ps.ctf, ps.rotations, ps.shifts)
    assert cio.read_particles(star).half_set is None
    reconstruct(ReconstructConfig(particles=star, out_dir=tmp_path / "a", threads=1))
    reconstruct(ReconstructConfig(particles=star, out_dir=tmp_path / "b", threads=1))
    h_a = cio.read_map(tmp_path / "a" / "half1.mrc")[0]
    np.testing.assert_array_equal(h_a, cio.read_map(tmp_path / "b" / "half1.mrc")[0])
    h_file = cio.read_map(reconstruct(ReconstructConfig(particles=noiseless_set, out_dir=tmp_path / "c",
                                                        threads=1)).out_dir / "half1.mrc")[0]
    assert not np.allclose(h_a, h_file)


def test_sign_is_applied(tmp_path, noiseless_set, monkeypatch):
    """Images stored with inverted contrast and ``sign = -1`` (CryoSPARC ``blob/sign``) give the same map."""
    ps = cio.read_particles(noiseless_set)
    cio.write_stack(tmp_path / "neg.mrcs", -ps.read_images(np.arange(len(ps))), 3.0)
    star = tmp_path / "neg.star"
    cio.new_star(star, [f"{i + 1:06d}@neg.mrcs" for i in range(len(ps))], 3.0, 32, 300.0, 2.7, 0.1, ps.ctf,
                 ps.rotations, ps.shifts, extra_columns={"rlnRandomSubset": ps.half_set})
    real_read = cio.read_particles

    def read_negative(path, project_dir=None):
        p = real_read(path, project_dir)
        p.sign = -np.ones(len(p), dtype=np.float32)
        return p

    monkeypatch.setattr(from_particles, "read_particles", read_negative)
    reconstruct(ReconstructConfig(particles=star, out_dir=tmp_path / "neg", threads=1))
    monkeypatch.setattr(from_particles, "read_particles", real_read)
    reconstruct(ReconstructConfig(particles=noiseless_set, out_dir=tmp_path / "pos", threads=1))
    a, b = cio.read_map(tmp_path / "neg" / "map.mrc")[0], cio.read_map(tmp_path / "pos" / "map.mrc")[0]
    np.testing.assert_allclose(a, b, atol=1e-4 * float(np.abs(b).max()))


def test_bad_input(tmp_path, noiseless_set, capsys):
    out = tmp_path / "o"
    assert main(["reconstruct", "--particles", str(tmp_path / "missing.star"), "--o", str(out)]) == 2
    assert "missing.star" in capsys.readouterr().err
    ps = cio.read_particles(noiseless_set)
    names = [f"{i + 1:06d}@{noiseless_set.parent / 'particles.mrcs'}" for i in range(len(ps))]
    noposes = tmp_path / "noposes.star"
    cio.new_star(noposes, names, 3.0, 32, 300.0, 2.7, 0.1, ps.ctf, None, None)
    assert main(["reconstruct", "--particles", str(noposes), "--o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no poses" in err and "Fix:" in err
    assert main(["reconstruct", "--particles", str(noiseless_set), "--o", str(out), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert _listing(out) == []


def test_failure_writes_nothing(tmp_path, noiseless_set, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(from_particles, "fsc_plot", broken_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        reconstruct(ReconstructConfig(particles=noiseless_set, out_dir=tmp_path / "o", threads=1))
    assert _listing(tmp_path / "o") == []
