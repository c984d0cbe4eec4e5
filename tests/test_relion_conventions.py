"""Proofs against the real RELION 3.1 binaries (they must run in CI: a missing binary FAILS, see conftest).

a. ``cryofastar simulate`` output (noiseless, CTF, shifts) reconstructed by ``relion_reconstruct --ctf``
   and by ``cryofastar reconstruct``: both match the truth and each other (FSC >= 0.9 up to 0.75 Nyquist).
b. Particles made by ``relion_project --ctf`` from a STAR with angles, Å origins and CTF: our
   reconstruction of RELION's own STAR matches ``relion_reconstruct``'s and the truth by the same measure.
c. Image by image: ``relion_project`` of our simulated STAR reproduces our simulated images.

The FSC curves are printed (``pytest -s`` or the captured-output section shows them).
"""
from __future__ import annotations

import subprocess
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryofastar_core.reconstruct import fsc

pytestmark = pytest.mark.relion

BOX = 32
FSC_MIN = 0.9
NYQUIST_FRACTION = 0.75


def _relion(args, cwd, timeout=300):
    t0 = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return time.perf_counter() - t0


def _cli(run_cli, *args, cwd=None):
    t0 = time.perf_counter()
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == 0, f"cryofastar {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return time.perf_counter() - t0, proc


def _load(path):
    with mrcfile.open(path, permissive=True) as m:
        return torch.from_numpy(np.asarray(m.data, dtype=np.float64).copy())


def _fsc_report(title, maps: dict, pairs):
    """FSC curves of ``pairs`` of named maps, printed as one table; returns ``{pair: fsc (S,)}``."""
    curves = {}
    freq = None
    for a, b in pairs:
        freq, c = fsc(maps[a], maps[b])
        curves[f"{a}~{b}"] = c.numpy()
    print(f"\n{title}\nshell  freq(1/px) " + " ".join(f"{k:>16s}" for k in curves))
    for i, f in enumerate(freq.numpy()):
        print(f"{i:5d}  {f:9.4f}  " + " ".join(f"{curves[k][i]:16.4f}" for k in curves))
    return curves


def _assert_fsc_high(curves, box=BOX):
    last = int(np.floor(NYQUIST_FRACTION * box / 2))  # shell index at 0.75 Nyquist
    for name, c in curves.items():
        worst = int(np.argmin(c[: last + 1]))
        assert c[worst] >= FSC_MIN, (f"FSC {name} = {c[worst]:.3f} at shell {worst} (<= {last} = "
                                     f"{NYQUIST_FRACTION} Nyquist required >= {FSC_MIN})")


def test_simulate_then_relion_reconstruct_matches_ours(tmp_path, tiny_map_file, relion, run_cli):
    sim = tmp_path / "sim"
    t_sim, _ = _cli(run_cli, "simulate", "--map", tiny_map_file, "--n", 2000, "--box", BOX, "--snr", "inf",
                    "--ctf", "--max-shift", 3, "--seed", 11, "--o", sim)
    # RELION resolves rlnImageName against its working directory: run it from the STAR's folder.
    t_rel = _relion([relion["relion_reconstruct"], "--i", "particles.star", "--o", "relion.mrc", "--ctf"], cwd=sim)
    t_ours, proc = _cli(run_cli, "reconstruct", "--particles", sim / "particles.star", "--o", tmp_path / "ours",
                        "--threads", 1)
    assert "0.143" in proc.stdout
    maps = {"truth": _load(sim / "truth.mrc"), "relion": _load(sim / "relion.mrc"),
            "ours": _load(tmp_path / "ours" / "map.mrc")}
    print(f"\n[a] simulate {t_sim:.1f} s, relion_reconstruct {t_rel:.1f} s, cryofastar reconstruct {t_ours:.1f} s "
          f"(2000 particles, box {BOX})")
    curves = _fsc_report("[a] cryofastar simulate -> reconstruct (noiseless, CTF, shifts <= 3 px)", maps,
                         [("ours", "relion"), ("ours", "truth"), ("relion", "truth")])
    _assert_fsc_high(curves)


def _relion_angles_star(path, n, apix, seed):
    """A RELION 3.1 STAR of ``n`` random orientations, Å origins and astigmatic CTFs (input of relion_project)."""
    rng = np.random.default_rng(seed)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    defocus = rng.uniform(5000, 30000, n)
    astig = rng.uniform(0, 500, n)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@unused.mrcs" for i in range(n)], "rlnOpticsGroup": np.ones(n, int),
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-3, 3, n) * apix, "rlnOriginYAngst": rng.uniform(-3, 3, n) * apix,
        "rlnDefocusU": defocus + astig / 2, "rlnDefocusV": defocus - astig / 2,
        "rlnDefocusAngle": rng.uniform(0, 180, n),
    })
    starfile.write({"optics": optics, "particles": parts}, path, overwrite=True)


def test_relion_project_particles_reconstruct_like_relion(tmp_path, tiny_map_file, tiny_map, relion, run_cli):
    vol, apix = tiny_map
    work = tmp_path / "proj"
    work.mkdir()
    _relion_angles_star(work / "angles.star", 2000, apix, seed=5)
    t_proj = _relion([relion["relion_project"], "--i", tiny_map_file, "--ang", "angles.star", "--o", "proj",
                      "--ctf"], cwd=work)
    t_rel = _relion([relion["relion_reconstruct"], "--i", "proj.star", "--o", "relion.mrc", "--ctf"], cwd=work)
    # RELION's STAR names its stack relative to the project folder (here: work).
    t_ours, _ = _cli(run_cli, "reconstruct", "--particles", work / "proj.star", "--project-dir", work,
                     "--o", tmp_path / "ours", "--threads", 1)
    maps = {"truth": torch.from_numpy(np.asarray(vol, dtype=np.float64)), "relion": _load(work / "relion.mrc"),
            "ours": _load(tmp_path / "ours" / "map.mrc")}
    print(f"\n[b] relion_project {t_proj:.1f} s, relion_reconstruct {t_rel:.1f} s, cryofastar reconstruct "
          f"{t_ours:.1f} s (2000 particles, box {BOX})")
    curves = _fsc_report("[b] relion_project --ctf (origins in Å) -> reconstruct", maps,
                         [("ours", "relion"), ("ours", "truth"), ("relion", "truth")])
    _assert_fsc_high(curves)


def test_relion_project_reproduces_our_simulated_images(tmp_path, tiny_map_file, relion, run_cli):
    sim = tmp_path / "sim"
    _cli(run_cli, "simulate", "--map", tiny_map_file, "--n", 40, "--box", BOX, "--snr", "inf", "--ctf",
         "--max-shift", 4, "--seed", 3, "--o", sim)
    _relion([relion["relion_project"], "--i", "truth.mrc", "--ang", "particles.star", "--o", "relion_proj", "--ctf"],
            cwd=sim)
    with mrcfile.open(sim / "particles.mrcs") as m:
        ours = np.asarray(m.data, dtype=np.float64)
    with mrcfile.open(sim / "relion_proj.mrcs") as m:
        theirs = np.asarray(m.data, dtype=np.float64)
    assert ours.shape == theirs.shape == (40, BOX, BOX)
    a = ours.reshape(40, -1) - ours.reshape(40, -1).mean(1, keepdims=True)
    b = theirs.reshape(40, -1) - theirs.reshape(40, -1).mean(1, keepdims=True)
    cc = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    print(f"\n[c] per-image CC(ours, relion_project): min {cc.min():.4f}, median {np.median(cc):.4f}")
    # A wrong rotation, shift sign, CTF sign or astigmatism angle gives CC far below this.
    assert cc.min() > 0.98


def test_high_defocus_reconstruction_like_relion(tmp_path, tiny_map_file, relion):
    """Defocus 2.5-3 µm at 3 Å/px, box 32: the CTF's point spread reaches beyond the box.

    Our simulator and ``relion_project`` apply the CTF on the box's own Fourier grid (a circular
    convolution, test c), and ``relion_reconstruct`` inverts it on that grid. Both must stay above the
    threshold.
    """
    from cryofastar_core.reconstruct.from_particles import ReconstructConfig, reconstruct_particles as reconstruct
    from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

    star = simulate(SimulateConfig(out_dir=tmp_path / "sim", n=1000, box=BOX, snr=float("inf"), seed=2,
                                   map_path=tiny_map_file, ctf=True, max_shift=2.0, defocus_min=25000.0,
                                   defocus_max=30000.0))
    _relion([relion["relion_reconstruct"], "--i", "particles.star", "--o", "relion.mrc", "--ctf"], cwd=star.parent)
    reconstruct(ReconstructConfig(particles=star, out_dir=tmp_path / "ours", threads=1))
    maps = {"truth": _load(star.parent / "truth.mrc"), "relion": _load(star.parent / "relion.mrc"),
            "ours": _load(tmp_path / "ours" / "map.mrc")}
    curves = _fsc_report("[d] defocus 2.5-3 µm, 3 Å/px, box 32 (1000 particles, noiseless)", maps,
                         [("relion", "truth"), ("ours", "truth"), ("ours", "relion")])
    _assert_fsc_high({"relion~truth": curves["relion~truth"]})
    _assert_fsc_high({k: v for k, v in curves.items() if k.startswith("ours")})
