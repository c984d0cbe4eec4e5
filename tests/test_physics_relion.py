"""Our projection, shift and CTF against the real ``relion_project`` binary (RELION convention)."""
from __future__ import annotations

import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryofastar_core.geometry import relion_euler_to_matrix
from cryofastar_core.physics.ctf import CTFParams, compute_ctf
from cryofastar_core.physics.fourier import fft2c, ifft2c
from cryofastar_core.physics.projection import prepare_volume, project_ft
from cryofastar_core.physics.shift import phase_ramp

pytestmark = pytest.mark.relion

BOX, APIX = 32, 2.0


def _blob_map() -> np.ndarray:
    """Asymmetric map: Gaussian blobs of different sizes and weights at asymmetric places."""
    c = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((BOX,) * 3, np.float32)
    for px, py, pz, s, a in [(5, -3, 2, 2.0, 1.0), (-6, 4, -1, 1.5, 0.8), (2, 7, -5, 2.5, 0.6), (-3, -6, 6, 1.2, 1.2)]:
        vol += a * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * s * s))
    return vol


@pytest.fixture(scope="module")
def blob_map(tmp_path_factory, relion):
    d = tmp_path_factory.mktemp("relion_project")
    vol = _blob_map()
    with mrcfile.new(d / "map.mrc") as m:
        m.set_data(vol)
        m.voxel_size = APIX
    return d, torch.from_numpy(vol)


def _run(args, cwd):
    subprocess.run(["relion_project", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _cc(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def test_projection_and_shift_match_relion_project(blob_map):
    d, vol = blob_map
    _run(["--i", "map.mrc", "--o", "p0.mrc", "--rot", "30", "--tilt", "50", "--psi", "70", "--angpix", str(APIX)], d)
    _run(["--i", "map.mrc", "--o", "p1.mrc", "--rot", "30", "--tilt", "50", "--psi", "70",
          "--xoff", "3", "--yoff", "-2", "--angpix", str(APIX)], d)
    ref0 = torch.from_numpy(mrcfile.read(d / "p0.mrc").astype(np.float32))
    ref1 = torch.from_numpy(mrcfile.read(d / "p1.mrc").astype(np.float32))
    R = relion_euler_to_matrix(30.0, 50.0, 70.0).float()[None]
    vft = prepare_volume(vol, pad=2)
    ft = project_ft(vft, R)
    ours0 = ifft2c(ft).real[0]
    assert _cc(ours0, ref0) > 0.99
    # Same normalisation as RELION (sum along the ray): the norms agree, not just the shapes.
    assert abs(float(ours0.norm() / ref0.norm()) - 1) < 0.02
    # --xoff/--yoff are origins: the internal shift is (+xoff, +yoff), i.e. content moves by (-3, +2) px.
    ours1 = ifft2c(ft * phase_ramp(BOX, torch.tensor([[3.0, -2.0]]))).real[0]
    wrong = ifft2c(ft * phase_ramp(BOX, torch.tensor([[-3.0, 2.0]]))).real[0]
    assert _cc(ours1, ref1) > 0.99
    assert _cc(wrong, ref1) < 0.5
    # and the same statement in real space: the shifted projection is the centred one moved by (-3, +2)
    assert _cc(torch.roll(ref0, shifts=(2, -3), dims=(0, 1)), ref1) > 0.99


def test_ctf_matches_relion_project(blob_map):
    d, vol = blob_map
    n = 3
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)], "rlnOpticsGroup": [1] * n,
        "rlnAngleRot": [30.0, -120.0, 75.0], "rlnAngleTilt": [50.0, 100.0, 20.0], "rlnAnglePsi": [70.0, 10.0, -40.0],
        "rlnOriginXAngst": [6.0, -2.0, 1.0], "rlnOriginYAngst": [-4.0, 3.0, 5.0],
        # strong astigmatism, non-zero angles of both signs, a phase shift and a B-factor
        "rlnDefocusU": [15000.0, 9000.0, 12000.0], "rlnDefocusV": [11000.0, 8000.0, 10000.0],
        "rlnDefocusAngle": [35.0, -60.0, 110.0], "rlnPhaseShift": [0.0, 0.0, 40.0],
        "rlnCtfBfactor": [0.0, 0.0, 80.0], "rlnCtfScalefactor": [1.0, 1.0, 1.0]})
    starfile.write({"optics": optics, "particles": parts}, d / "ang.star", overwrite=True)
    _run(["--i", "map.mrc", "--o", "pc", "--ang", "ang.star", "--ctf", "--angpix", str(APIX)], d)
    ref = torch.from_numpy(mrcfile.read(d / "pc.mrcs").astype(np.float32))

    t = lambda col: torch.tensor(parts[col].to_numpy())
    R = relion_euler_to_matrix(t("rlnAngleRot"), t("rlnAngleTilt"), t("rlnAnglePsi")).float()
    shifts = torch.stack([t("rlnOriginXAngst"), t("rlnOriginYAngst")], -1).float() / APIX
    arrays = dict(defocus_u=parts.rlnDefocusU.to_numpy(), defocus_v=parts.rlnDefocusV.to_numpy(),
                  defocus_angle=parts.rlnDefocusAngle.to_numpy(), voltage=300.0, cs=2.7, amplitude_contrast=0.1,
                  phase_shift=parts.rlnPhaseShift.to_numpy(), bfactor=parts.rlnCtfBfactor.to_numpy())
    ctf = CTFParams.from_arrays(arrays)
    ft = project_ft(prepare_volume(vol, pad=2), R) * phase_ramp(BOX, shifts)
    ours = ifft2c(ft * compute_ctf(ctf, BOX, APIX)).real
    for i in range(n):
        assert _cc(ours[i], ref[i]) > 0.99, i
        assert abs(float(ours[i].norm() / ref[i].norm()) - 1) < 0.03, i


def test_ctf_image_matches_relion_through_a_point_map(tmp_path, relion):
    """A point at the map centre projects to a point, so RELION's output with --ctf is the CTF's
    inverse transform: its centred FT is RELION's CTF itself, compared pixel by pixel with ours."""
    box = 64
    vol = np.zeros((box,) * 3, np.float32)
    vol[box // 2, box // 2, box // 2] = 1.0
    with mrcfile.new(tmp_path / "point.mrc") as m:
        m.set_data(vol)
        m.voxel_size = APIX
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [200.0],
                           "rlnSphericalAberration": [2.0], "rlnAmplitudeContrast": [0.07],
                           "rlnImagePixelSize": [APIX], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    arrays = dict(defocus_u=np.array([16000.0, 9000.0]), defocus_v=np.array([10000.0, 8500.0]),
                  defocus_angle=np.array([30.0, -75.0]), voltage=200.0, cs=2.0, amplitude_contrast=0.07,
                  phase_shift=np.array([0.0, 60.0]), bfactor=np.array([0.0, 100.0]), scale=np.array([1.0, 0.8]))
    parts = pd.DataFrame({"rlnImageName": ["000001@x.mrcs", "000002@x.mrcs"], "rlnOpticsGroup": [1, 1],
                          "rlnAngleRot": [0.0, 0.0], "rlnAngleTilt": [0.0, 0.0], "rlnAnglePsi": [0.0, 0.0],
                          "rlnOriginXAngst": [0.0, 0.0], "rlnOriginYAngst": [0.0, 0.0],
                          "rlnDefocusU": arrays["defocus_u"], "rlnDefocusV": arrays["defocus_v"],
                          "rlnDefocusAngle": arrays["defocus_angle"], "rlnPhaseShift": arrays["phase_shift"],
                          "rlnCtfBfactor": arrays["bfactor"], "rlnCtfScalefactor": arrays["scale"]})
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "ang.star", overwrite=True)
    _run(["--i", "point.mrc", "--o", "pc", "--ang", "ang.star", "--ctf", "--angpix", str(APIX)], tmp_path)
    relion_ctf = fft2c(torch.from_numpy(mrcfile.read(tmp_path / "pc.mrcs").astype(np.float64))).real
    # RELION's projector transfer function (interpolation of a flat spectrum) is ~1 but not exactly:
    # estimate it from a CTF-free projection of the same point and divide it out.
    _run(["--i", "point.mrc", "--o", "p0.mrc", "--angpix", str(APIX)], tmp_path)
    transfer = fft2c(torch.from_numpy(mrcfile.read(tmp_path / "p0.mrc").astype(np.float64))).real
    k = torch.arange(box) - box // 2
    inside = (k[:, None] ** 2 + k[None, :] ** 2) < (0.9 * box / 2) ** 2
    ratio = relion_ctf / transfer
    ours = compute_ctf(CTFParams.from_arrays(arrays, dtype=torch.float64), box, APIX)
    assert float((ours - ratio)[:, inside].abs().max()) < 1e-4  # measured 6e-8
    # The convention checks are sharp: the mirrored astigmatism angle or the opposite sign are far off.
    mirrored = compute_ctf(CTFParams.from_arrays({**arrays, "defocus_angle": -arrays["defocus_angle"]},
                                                 dtype=torch.float64), box, APIX)
    assert float((mirrored - ratio)[:, inside].abs().max()) > 0.5
    assert float((-ours - ratio)[:, inside].abs().max()) > 0.5
