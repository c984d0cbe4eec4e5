"""Physics benchmark: projection and reconstruction throughput, and our reconstruction against
``relion_reconstruct`` on the same STAR file (time ratio at equal FSC, same thread count).

    PYTHONPATH=. python bench/bench_physics.py --boxes 64 --threads 1            # short default run
    PYTHONPATH=. python bench/bench_physics.py --boxes 64 128 --relion-n 2000 --threads 1

The RELION comparison writes a map, a STAR file with random poses, shifts and astigmatic CTFs, lets
``relion_project --ctf`` simulate the stack (RELION's own physics), then times ``relion_reconstruct
--ctf`` (single-threaded in RELION 3.1; it has no thread option) and our ``reconstruct`` (read the STAR
with ``cryofastar_core.io``, insert, finalize) with torch set to ``--threads`` threads. Both maps are
compared with the true map by FSC. Nothing is run by CI.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from cryofastar_core.geometry import matrix_to_relion_euler, random_rotations
from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.projection import prepare_volume, project
from cryofastar_core.reconstruct import Backprojector, fsc, reconstruct, resolution_at
from cryofastar_core.simulation.images import simulate_images


def blob_volume(box: int, n_blobs: int | None = None, seed: int = 0) -> torch.Tensor:
    """Asymmetric test map: Gaussian blobs of sigma 0.8-1.6 px (signal up to Nyquist at every box, so the
    high-frequency FSC measures the method, not numerical noise) inside a sphere of radius box/4."""
    n_blobs = n_blobs or int(40 * (box / 64) ** 2)
    g = np.random.default_rng(seed)
    c = np.arange(box, dtype=np.float32) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3, np.float32)
    for _ in range(n_blobs):
        p = g.uniform(-1, 1, 3)
        p = p / max(1.0, np.linalg.norm(p)) * box / 4
        s = g.uniform(0.8, 1.6)
        vol += g.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return torch.from_numpy(vol)


def random_ctf(n: int, g: torch.Generator) -> CTFParams:
    du = torch.rand(n, generator=g) * 10000 + 8000
    return CTFParams.from_arrays({"defocus_u": du, "defocus_v": du - torch.rand(n, generator=g) * 1500,
                                  "defocus_angle": torch.rand(n, generator=g) * 360 - 180, "voltage": 300.0,
                                  "cs": 2.7, "amplitude_contrast": 0.1})


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def bench_throughput(box: int, n_proj: int, n_rec: int, apix: float) -> dict:
    vol = blob_volume(box)
    g = torch.Generator().manual_seed(0)
    vft, t_prep = _timed(lambda: prepare_volume(vol, pad=2))
    R = random_rotations(n_proj, g)
    project(vft, R[:8])  # warm-up
    _, t_proj = _timed(lambda: project(vft, R))
    shifts = torch.rand(n_proj, 2, generator=g) * 6 - 3
    ctf = random_ctf(n_proj, g)
    _, t_sim = _timed(lambda: simulate_images(vft, R, shifts, ctf, apix, 1.0, generator=g))
    Rr = random_rotations(n_rec, g)
    sr = torch.rand(n_rec, 2, generator=g) * 6 - 3
    cr = random_ctf(n_rec, g)
    imgs, _ = simulate_images(vft, Rr, sr, cr, apix, None)
    bp = Backprojector(box, pad=2)
    _, t_ins = _timed(lambda: bp.insert(imgs, Rr, sr, cr, apix))
    rec, t_fin = _timed(bp.finalize)
    return {"box": box, "prepare_volume_s": round(t_prep, 3),
            "project_img_per_s": round(n_proj / t_proj, 1), "simulate_img_per_s": round(n_proj / t_sim, 1),
            "insert_img_per_s": round(n_rec / t_ins, 1), "finalize_s": round(t_fin, 3),
            "reconstruct_img_per_s": round(n_rec / (t_ins + t_fin), 1), "n_proj": n_proj, "n_rec": n_rec}


def _write_star(path: Path, R: torch.Tensor, shifts_px: torch.Tensor, ctf: CTFParams, apix: float, box: int) -> None:
    rot, tilt, psi = (a.numpy() for a in matrix_to_relion_euler(R.double()))
    n = R.shape[0]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@none.mrcs" for i in range(n)], "rlnOpticsGroup": np.ones(n, int),
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": shifts_px[:, 0].double().numpy() * apix, "rlnOriginYAngst": shifts_px[:, 1].double().numpy() * apix,
        "rlnDefocusU": ctf.defocus_u.double().numpy(), "rlnDefocusV": ctf.defocus_v.double().numpy(),
        "rlnDefocusAngle": ctf.defocus_angle.double().numpy(), "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n)})
    starfile.write({"optics": optics, "particles": parts}, path, overwrite=True)


def _read_ours(star: Path):
    """Poses, CTF and images from the STAR file (the project's reader if present, else starfile)."""
    try:
        from cryofastar_core.io import read_particles
    except ImportError:  # pragma: no cover - the io package is written by another helper
        read_particles = None
    if read_particles is not None:
        ps = read_particles(star, project_dir=star.parent)
        imgs = torch.from_numpy(ps.read_images(np.arange(len(ps))))
        return (imgs, torch.from_numpy(ps.rotations).float(), torch.from_numpy(ps.shifts).float(),
                ps.ctf_params(), float(ps.apix[0]))
    raise RuntimeError("cryofastar_core.io.read_particles is not available")


def bench_vs_relion(box: int, n: int, apix: float, threads: int, workdir: Path, noise_sigma: float = 0.0) -> dict:
    vol = blob_volume(box)
    with mrcfile.new(workdir / "truth.mrc", overwrite=True) as m:
        m.set_data(vol.numpy())
        m.voxel_size = apix
    g = torch.Generator().manual_seed(1)
    R = random_rotations(n, g, dtype=torch.float64)
    shifts = torch.rand(n, 2, generator=g, dtype=torch.float64) * 6 - 3
    _write_star(workdir / "ang.star", R, shifts, random_ctf(n, g), apix, box)
    cmd = ["relion_project", "--i", "truth.mrc", "--o", "sim", "--ang", "ang.star", "--ctf", "--angpix", str(apix)]
    if noise_sigma > 0:
        cmd += ["--add_noise", "--white_noise", str(noise_sigma)]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True)
    _, t_rel = _timed(lambda: subprocess.run(
        ["relion_reconstruct", "--i", "sim.star", "--o", "relion.mrc", "--ctf", "--angpix", str(apix)],
        cwd=workdir, check=True, capture_output=True))
    rel = torch.from_numpy(mrcfile.read(workdir / "relion.mrc").astype(np.float32))

    def ours():
        imgs, Rs, sh, ctf, ap = _read_ours(workdir / "sim.star")
        bp = Backprojector(box, pad=2)
        bp.insert(imgs, Rs, sh, ctf, ap)
        return bp.finalize()

    torch.set_num_threads(threads)
    rec, t_ours = _timed(ours)
    out = {"box": box, "n": n, "threads": threads, "noise_sigma": noise_sigma,
           "relion_reconstruct_s": round(t_rel, 2), "ours_s": round(t_ours, 2),
           "speedup": round(t_rel / t_ours, 2)}
    for name, m in (("relion", rel), ("ours", rec)):
        freq, curve = fsc(m, vol)
        out[f"{name}_fsc_res_0.5_A"] = round(resolution_at(freq, curve, apix, 0.5), 2)
        out[f"{name}_fsc_res_0.9_A"] = round(resolution_at(freq, curve, apix, 0.9), 2)
        out[f"{name}_fsc_curve"] = [round(float(c), 3) for c in curve]
    freq, curve = fsc(rec, rel)
    out["ours_vs_relion_fsc_min_to_0.9_nyquist"] = round(float(curve[1:int(0.9 * (box // 2)) + 1].min()), 3)
    return out


def blob_params(box: int, n: int = 30, seed: int = 0):
    """Gaussian blobs (position px, sigma px, amplitude) whose projections are known exactly."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * box * 0.45
    sig = 0.9 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    amp = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    return pos, sig, amp


def render_blobs(box: int, blobs) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros((box,) * 3, dtype=torch.float64)
    for p, s, a in zip(*blobs):
        vol += a * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return vol.float()


def exact_projections(box: int, blobs, R: torch.Tensor) -> torch.Tensor:
    """Line integrals of the blobs: a blob at map position p appears at (R^T p)_xy."""
    pos, sig, amp = blobs
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    q = torch.einsum("nk,bkj->bnj", pos, R.double())          # (B, n, 3) = R^T p per image
    out = torch.zeros(R.shape[0], box, box, dtype=torch.float64)
    for i in range(pos.shape[0]):
        s, a = sig[i], amp[i]
        out += a * (2 * math.pi) ** 0.5 * s * torch.exp(
            -((x[None] - q[:, i, 0, None, None]) ** 2 + (y[None] - q[:, i, 1, None, None]) ** 2) / (2 * s * s))
    return out.float()


TEAMTOMO = ("torch_ctf", "torch_fourier_rescale", "torch_fourier_shell_correlation", "torch_fourier_slice")


def bench_libraries(box: int, n_proj: int = 64, n_rec: int = 1000) -> dict:
    """Our physics against the teamtomo packages (torch-fourier-slice, torch-ctf,
    torch-fourier-shell-correlation, torch-fourier-rescale) for correctness and speed."""
    for name in TEAMTOMO:  # all of them present before anything is measured
        importlib.import_module(name)
    out = {"box": box}
    blobs = blob_params(box)
    vol = render_blobs(box, blobs)
    g = torch.Generator().manual_seed(3)
    R = random_rotations(n_proj, g)
    ref = exact_projections(box, blobs, R)
    out.update(_compare_projection(vol, R, ref))
    out.update(_compare_reconstruction(vol, box, n_rec, g))
    out.update(_compare_ctf(box, g))
    out.update(_compare_fsc_and_crop(vol, ref, box, g))
    return out


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((a - ref).norm() / ref.norm()), 4)


def _project_ours(vol: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return project(prepare_volume(vol, pad=2), R)


def _compare_projection(vol: torch.Tensor, R: torch.Tensor, ref: torch.Tensor) -> dict:
    """Projection error against the exact line integrals ``ref``, and time per image."""
    import torch_fourier_slice

    n_proj = R.shape[0]
    out = {}
    ours, t = _timed(_project_ours, vol, R)
    out["project_ours_pad2_err"], out["project_ours_pad2_ms"] = _rel_err(ours, ref), round(t / n_proj * 1e3, 2)
    nogc = project(prepare_volume(vol, pad=2, gridding_correction=False), R)
    out["project_ours_pad2_no_gridding_err"] = _rel_err(nogc, ref)
    tfs, t = _timed(torch_fourier_slice.project_3d_to_2d, vol, R, pad_factor=2.0)
    out["project_tfs_pad2_err"], out["project_tfs_pad2_ms"] = _rel_err(tfs, ref), round(t / n_proj * 1e3, 2)
    return out


def _tfs_backproject(imgs: torch.Tensor, R: torch.Tensor, n_rec: int) -> torch.Tensor:
    import torch_fourier_slice

    num = None
    for s in range(0, n_rec, 250):  # it needs chunking: one call holds every padded slice in memory
        part = torch_fourier_slice.backproject_2d_to_3d(imgs[s:s + 250], R[s:s + 250], pad_factor=2.0)
        num = part if num is None else num + part
    return num


def _compare_reconstruction(vol: torch.Tensor, box: int, n_rec: int, g: torch.Generator) -> dict:
    """Reconstruction without CTF (torch-fourier-slice has no CTF weighting) from noiseless projections:
    time and FSC with the true map at 0.75 Nyquist."""
    out = {}
    Rr = random_rotations(n_rec, g)
    imgs, _ = simulate_images(prepare_volume(vol, pad=3), Rr)
    rec, t_ours = _timed(reconstruct, imgs, Rr)
    out["reconstruct_ours_s"] = round(t_ours, 2)
    out["reconstruct_ours_fsc_0.75nyq"] = round(float(fsc(rec, vol)[1][int(0.75 * box / 2)]), 4)
    rec_t, t_tfs = _timed(_tfs_backproject, imgs, Rr, n_rec)
    out["reconstruct_tfs_s"] = round(t_tfs, 2)
    out["reconstruct_tfs_fsc_0.75nyq"] = round(float(fsc(rec_t, vol)[1][int(0.75 * box / 2)]), 4)
    return out


def _torch_ctf(ctf: CTFParams, box: int) -> torch.Tensor:
    """torch-ctf's CTF: it takes the mean defocus and half the astigmatism in µm."""
    import torch_ctf

    return torch_ctf.calculate_ctf_2d(
        defocus=(ctf.defocus_u + ctf.defocus_v) / 2e4, astigmatism=(ctf.defocus_u - ctf.defocus_v) / 2e4,
        astigmatism_angle=ctf.defocus_angle, voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.1,
        phase_shift=0.0, pixel_size=1.5, image_shape=(box, box), rfft=False, fftshift=True)


def _compare_ctf(box: int, g: torch.Generator) -> dict:
    """Largest difference from torch-ctf over 256 astigmatic CTFs, and the time for them."""
    from cryofastar_core.physics.ctf import compute_ctf

    out = {}
    n = 256
    ctf = random_ctf(n, g)
    ours_ctf, t_c = _timed(compute_ctf, ctf, box, 1.5)
    theirs, t_t = _timed(_torch_ctf, ctf, box)
    out["ctf_max_abs_diff_vs_torch_ctf"] = float(f"{float((ours_ctf - theirs).abs().max()):.2e}")
    out["ctf_ours_ms_per_256"], out["ctf_torch_ctf_ms_per_256"] = round(t_c * 1e3, 1), round(t_t * 1e3, 1)
    return out


def _compare_fsc_and_crop(vol: torch.Tensor, ref: torch.Tensor, box: int, g: torch.Generator) -> dict:
    """FSC against torch-fourier-shell-correlation, Fourier crop against torch-fourier-rescale."""
    import torch_fourier_rescale
    import torch_fourier_shell_correlation

    from cryofastar_core.physics.fourier import fourier_crop

    out = {}
    noisy = vol + 0.05 * torch.randn(vol.shape, generator=g)
    f_ours = fsc(vol, noisy)[1]
    f_tt = torch_fourier_shell_correlation.fsc(vol, noisy)
    m = min(len(f_ours), len(f_tt))
    out["fsc_max_abs_diff_vs_torch_fsc"] = round(float((f_ours[:m].float() - f_tt[:m].float()).abs().max()), 4)
    img = ref[:8]
    ours_crop = fourier_crop(img, box // 2)
    tt_crop, _ = torch_fourier_rescale.fourier_rescale_2d(img, source_spacing=1.0, target_spacing=2.0)
    out["crop_rel_diff_vs_torch_fourier_rescale"] = float(f"{float((ours_crop - tt_crop).norm() / ours_crop.norm()):.2e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-proj", type=int, default=256, help="projections per throughput measurement")
    ap.add_argument("--n-rec", type=int, default=None, help="images per reconstruction (default 131072 / box)")
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--relion-n", type=int, default=1000, help="particles in the RELION comparison (0: skip)")
    ap.add_argument("--relion-noise", type=float, default=0.0, help="white noise sigma for relion_project")
    ap.add_argument("--libraries", action="store_true", help="also compare with the teamtomo torch-* packages")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "throughput": [], "relion": []}
    for box in args.boxes:
        n_rec = args.n_rec or max(64, 131072 // box)
        r = bench_throughput(box, args.n_proj, n_rec, args.apix)
        print(json.dumps(r), flush=True)
        results["throughput"].append(r)
    if args.libraries:
        results["libraries"] = []
        for box in args.boxes:
            r = bench_libraries(box)
            print(json.dumps(r), flush=True)
            results["libraries"].append(r)
    if args.relion_n > 0:
        if shutil.which("relion_reconstruct") is None:
            print("relion_reconstruct not on PATH: skipping the RELION comparison", file=sys.stderr)
        else:
            for box in args.boxes:
                with tempfile.TemporaryDirectory() as d:
                    r = bench_vs_relion(box, args.relion_n, args.apix, args.threads, Path(d), args.relion_noise)
                print(json.dumps(r), flush=True)
                results["relion"].append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
