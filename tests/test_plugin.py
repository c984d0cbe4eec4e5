"""The CryoSPARC connector end to end, with the real cryosparc-tools ``Dataset`` for every ``.cs`` and a
recording fake in place of the one server seam (``plugin.server.CryoSPARCServer``).

The particle set is a small CryoSPARC-style project folder built here by hand: a simulated stack at
``J1/imported/particles.mrcs`` and a ``.cs`` written with ``Dataset`` (CryoSPARC's fields). Tiny untrained
weights: this checks plumbing and conventions, not accuracy.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import shutil
from pathlib import Path, PurePosixPath

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from cryosparc import mrc as cs_mrc
from cryosparc.dataset import Dataset
from scipy.spatial.transform import Rotation

from cryofastar_core import geometry
from cryofastar_core.cli.simulate import SimulateConfig, simulate
from plugin import cli, run_in_cryosparc
from plugin.server import CryoSPARCServer, JobInfo

BOX = 32
N = 80
PROJECT, WORKSPACE, SOURCE = "P3", "W1", "J42"
EXT = "J50"
STACK = "J1/imported/particles.mrcs"
SECRET = "pa55-Wörd_do-not-leak-7f3a"
JOB_ARGS = ["--views", "16", "--candidates", "3", "--anchors", "4", "--device", "cpu", "--chunks-per-batch", "2"]
JOB_KW = dict(views=16, candidates=3, anchors=4, device="cpu", chunks_per_batch=2)

# alignments3D as CryoSPARC defines it, written out here independently of the code under test.
ALIGNMENTS3D = [("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
                ("alignments3D/psize_A", "<f4"), ("alignments3D/error", "<f4"), ("alignments3D/error_min", "<f4"),
                ("alignments3D/resid_pow", "<f4"), ("alignments3D/slice_pow", "<f4"),
                ("alignments3D/image_pow", "<f4"), ("alignments3D/cross_cor", "<f4"), ("alignments3D/alpha", "<f4"),
                ("alignments3D/alpha_min", "<f4"), ("alignments3D/weight", "<f4"), ("alignments3D/pose_ess", "<f4"),
                ("alignments3D/shift_ess", "<f4"), ("alignments3D/class_posterior", "<f4"),
                ("alignments3D/class", "<u4"), ("alignments3D/class_ess", "<f4")]


# --- fixtures ------------------------------------------------------------------------------------
def _write_particles_cs(path: Path, tabs: dict, n: int, blob_idx: np.ndarray | None = None) -> Dataset:
    """A particle ``.cs`` as CryoSPARC's extraction writes it: blob, ctf and location slots, no alignments."""
    p, optics = tabs["particles"], tabs["optics"].iloc[0]
    fields = [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
              ("blob/sign", "<f4"), ("blob/import_sig", "<u8"),
              ("ctf/type", "O"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
              ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
              ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"),
              ("ctf/shift_A", "<f4", (2,)), ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)),
              ("ctf/tetra_A", "<f4", (4,)), ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4"),
              ("location/micrograph_uid", "<u8"), ("location/exp_group_id", "<u4"), ("location/micrograph_path", "O"),
              ("location/micrograph_shape", "<u4", (2,)), ("location/center_x_frac", "<f4"),
              ("location/center_y_frac", "<f4")]
    ds = Dataset.allocate(n, fields)
    rng = np.random.default_rng(11)
    ds["uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    ds["blob/path"] = np.array([STACK] * n, dtype=object)
    ds["blob/idx"] = np.arange(n, dtype=np.uint32) if blob_idx is None else blob_idx
    ds["blob/shape"] = np.full((n, 2), BOX, dtype=np.uint32)
    ds["blob/psize_A"] = float(optics["rlnImagePixelSize"])
    ds["blob/sign"] = -1.0  # the stack is stored with inverted contrast, as CryoSPARC extracts it
    ds["blob/import_sig"] = 1234
    ds["ctf/type"] = np.array(["spline"] * n, dtype=object)
    ds["ctf/exp_group_id"] = 1
    ds["ctf/accel_kv"] = float(optics["rlnVoltage"])
    ds["ctf/cs_mm"] = float(optics["rlnSphericalAberration"])
    ds["ctf/amp_contrast"] = float(optics["rlnAmplitudeContrast"])
    ds["ctf/df1_A"] = p["rlnDefocusU"].to_numpy()
    ds["ctf/df2_A"] = p["rlnDefocusV"].to_numpy()
    ds["ctf/df_angle_rad"] = np.deg2rad(p["rlnDefocusAngle"].to_numpy())
    ds["ctf/phase_shift_rad"] = np.deg2rad(p["rlnPhaseShift"].to_numpy())
    ds["ctf/scale"] = p["rlnCtfScalefactor"].to_numpy()
    ds["ctf/scale_const"] = 1.0
    ds["ctf/anisomag"] = np.array([1.0, 0.0, 0.0, 1.0], dtype=np.float32)
    ds["ctf/bfactor"] = p["rlnCtfBfactor"].to_numpy()
    ds["location/micrograph_uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    ds["location/exp_group_id"] = 1
    ds["location/micrograph_path"] = np.array([f"J2/motioncorrected/mic_{i // 10:03d}.mrc" for i in range(n)], dtype=object)
    ds["location/micrograph_shape"] = np.array([4096, 4096], dtype=np.uint32)
    ds["location/center_x_frac"] = rng.uniform(0.05, 0.95, n)
    ds["location/center_y_frac"] = rng.uniform(0.05, 0.95, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save(path)
    return ds


@pytest.fixture(scope="module")
def cs_project(tmp_path_factory, tiny_map_file) -> dict:
    """``{"root": project folder, "cs": particles .cs inside it, "bad_cs": .cs with out-of-range blob/idx}``."""
    sim = simulate(SimulateConfig(out_dir=tmp_path_factory.mktemp("sim"), n=N, box=BOX, snr=1.0, seed=3,
                                  map_path=tiny_map_file, ctf=True, max_shift=1.0))
    tabs = starfile.read(sim)
    root = tmp_path_factory.mktemp("P3")
    with mrcfile.open(sim.parent / "particles.mrcs") as m:
        data = np.asarray(m.data, dtype=np.float32)
    (root / STACK).parent.mkdir(parents=True)
    with mrcfile.new(root / STACK) as m:
        m.set_data(-data)
        m.set_image_stack()
        m.voxel_size = 3.0
    cs = root / SOURCE / f"{SOURCE}_particles.cs"
    _write_particles_cs(cs, tabs, N)
    bad = root / "J43" / "J43_particles.cs"
    _write_particles_cs(bad, tabs, N, blob_idx=np.arange(N, dtype=np.uint32) + 500)
    return {"root": root, "cs": cs, "bad_cs": bad}


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the fake seam -------------------------------------------------------------------------------
class FakeServer:
    """Stands in for :class:`CryoSPARCServer`: records every call, returns real ``Dataset`` objects."""

    cryofastar_seam = True

    def __init__(self, project_root: Path, particles_cs: Path, server_root: Path, mounted: bool = True,
                 fail_in: str | None = None, fail_text: str = "boom"):
        self.root, self.particles_cs, self.server_root, self.mounted = project_root, particles_cs, server_root, mounted
        self.fail_in, self.fail_text = fail_in, fail_text
        self.calls: list[tuple[str, dict]] = []
        self.saved: dict[str, Dataset] = {}

    def _rec(self, call: str, **kw) -> None:
        self.calls.append((call, kw))
        if call == self.fail_in:
            raise RuntimeError(self.fail_text)

    def names(self, skip_logs: bool = True) -> list[str]:
        return [n for n, _ in self.calls if not (skip_logs and n == "log")]

    def find_job(self, project, job):
        self._rec("find_job", project=project, job=job)
        return JobInfo(uid=job, type="extract_micrographs_multi", status="completed", outputs=("particles", "micrographs"))

    def load_output(self, project, job, output, slots="all"):
        self._rec("load_output", project=project, job=job, output=output, slots=slots)
        return Dataset.load(self.particles_cs)

    def project_dir(self, project):
        self._rec("project_dir", project=project)
        return PurePosixPath(str(self.root)) if self.mounted else PurePosixPath("/nonexistent/cryosparc/P3")

    def download_file(self, project, path, target):
        self._rec("download_file", project=project, path=path)
        shutil.copyfile(self.root / path, target)

    def create_external_job(self, project, workspace, title, desc):
        self._rec("create_external_job", project=project, workspace=workspace, title=title, desc=desc)
        return EXT

    def connect_input(self, project, job, input_name, source_job, source_output, slots):
        self._rec("connect_input", project=project, job=job, input_name=input_name, source_job=source_job,
                  source_output=source_output, slots=list(slots))

    def start(self, project, job):
        self._rec("start", project=project, job=job)

    def add_output(self, project, job, type, name, slots, passthrough, title, alloc):
        self._rec("add_output", project=project, job=job, type=type, name=name, slots=list(slots),
                  passthrough=passthrough, title=title, alloc=alloc)
        fields = []
        for slot in slots:
            sname, dtype = (slot, slot) if isinstance(slot, str) else (slot["name"], slot["dtype"])
            if dtype == "alignments3D":
                fields += [(f"{sname}/{f[0].split('/')[1]}",) + f[1:] for f in ALIGNMENTS3D]
            elif dtype == "volume":
                fields += [(f"{sname}/path", "O"), (f"{sname}/shape", "<u4", (3,)), (f"{sname}/psize_A", "<f4")]
            else:
                raise AssertionError(f"unexpected slot {slot}")
        # As cryosparc-tools' alloc_output does: uids from a Dataset, or random uids for a count.
        if isinstance(alloc, Dataset):
            return Dataset({"uid": alloc["uid"]}).add_fields(fields)
        return Dataset.allocate(alloc, fields)

    def save_output(self, project, job, name, dataset):
        self._rec("save_output", project=project, job=job, name=name)
        buf = io.BytesIO()  # what the API would send: the real .cs serialisation
        dataset.save(buf)
        buf.seek(0)
        self.saved[name] = Dataset.load(buf)

    def upload_mrc(self, project, job, filename, data, psize):
        self._rec("upload_mrc", project=project, job=job, filename=filename, psize=psize)
        target = self.server_root / job / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        cs_mrc.write(str(target), np.asarray(data, dtype=np.float32), psize)
        return f"{job}/{filename}"

    def log(self, project, job, text, level="text", name=None):
        self._rec("log", project=project, job=job, text=text, level=level, name=name)

    def log_plot(self, project, job, image, text, raw_data=None):
        assert Path(image).is_file()
        self._rec("log_plot", project=project, job=job, image=Path(image).name, text=text, raw_data=raw_data)

    def set_tile_image(self, project, job, image):
        assert Path(image).read_bytes().startswith(b"\x89PNG")
        self._rec("set_tile_image", project=project, job=job, image=Path(image).name)

    def stop(self, project, job, error=""):
        self._rec("stop", project=project, job=job, error=error)


def test_fake_speaks_the_seams_interface():
    """The fake must not drift from the real seam: same public methods, same parameters."""
    real = {n: inspect.signature(f) for n, f in inspect.getmembers(CryoSPARCServer, inspect.isfunction)
            if not n.startswith("_")}
    fake = {n: inspect.signature(f) for n, f in inspect.getmembers(FakeServer, inspect.isfunction)
            if not n.startswith("_") and n != "names"}
    # (the classmethod constructor ``connect`` is not a plain function here; the CLI's connect= hook replaces it)
    assert set(real) == set(fake)
    for name in real:
        assert list(real[name].parameters) == list(fake[name].parameters), name


# --- checks shared by the round trips ----------------------------------------------------------------
def _check_cs_against_star(cs: Dataset, star_path: Path, source: Dataset) -> None:
    """The .cs beside the STAR agrees with it by the mapping under "Conventions" in plugin/README.md, row by row."""
    star = starfile.read(star_path)["particles"]
    assert len(star) == len(cs)
    names = [f"{int(i) + 1:06d}@{p}" for i, p in zip(cs["blob/idx"], cs["blob/path"])]
    assert star["rlnImageName"].tolist() == names
    pose = np.asarray(cs["alignments3D/pose"], dtype=np.float64)
    eul = star[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    # RELION Eulers are scipy's intrinsic ZYZ of the rotation vector.
    R_cs = Rotation.from_rotvec(pose).as_matrix()
    assert np.allclose(Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix(), R_cs, atol=1e-4)
    R_star = geometry.relion_euler_to_matrix(*(torch.as_tensor(eul[:, k]) for k in range(3))).numpy()
    assert np.allclose(R_star, R_cs, atol=1e-4)
    psize = np.asarray(cs["alignments3D/psize_A"], dtype=np.float64)
    assert np.allclose(psize, np.asarray(cs["blob/psize_A"]))
    shift = np.asarray(cs["alignments3D/shift"], dtype=np.float64)
    assert np.allclose(shift[:, 0] * psize, star["rlnOriginXAngst"], atol=1e-3)
    assert np.allclose(shift[:, 1] * psize, star["rlnOriginYAngst"], atol=1e-3)
    assert np.array_equal(np.asarray(cs["alignments3D/split"]).astype(int) + 1, star["rlnRandomSubset"].to_numpy())
    assert set(np.unique(cs["alignments3D/split"]).tolist()) == {0, 1}
    # Passthrough: every input field of the kept particles is unchanged, uids first.
    rows = {u: k for k, u in enumerate(np.asarray(source["uid"]).tolist())}
    take = np.array([rows[u] for u in np.asarray(cs["uid"]).tolist()])
    for f in source.fields():
        a, b = np.asarray(cs[f]), np.asarray(source[f])[take]
        assert (a == b).all(), f


def _check_alignment_dtypes(ds: Dataset) -> None:
    descr = {d[0]: d[1:] for d in ds.descr()}
    assert descr["alignments3D/pose"] == ("<f4", (3,))
    assert descr["alignments3D/shift"] == ("<f4", (2,))
    assert descr["alignments3D/psize_A"] == ("<f4",)
    assert descr["alignments3D/split"] == ("<u4",)
    assert descr["alignments3D/class"] == ("<u4",)
    for f in ("error", "weight", "class_posterior", "alpha"):
        assert descr[f"alignments3D/{f}"] == ("<f4",), f
    assert np.isfinite(np.asarray(ds["alignments3D/pose"])).all()
    assert (np.asarray(ds["alignments3D/class_posterior"]) == 1).all()
    assert (np.asarray(ds["alignments3D/weight"]) == 1).all()
    assert (np.asarray(ds["alignments3D/class"]) == 0).all()


# --- offline ---------------------------------------------------------------------------------------
def test_offline_round_trip(cs_project, tiny_weights, tmp_path, capsys):
    before = _checksums(cs_project["root"])
    out = tmp_path / "out"
    rc = cli.main(["--cs", str(cs_project["cs"]), "--project-dir", str(cs_project["root"]), "--o", str(out),
                   "--weights", str(tiny_weights), *JOB_ARGS])
    assert rc == 0, capsys.readouterr().err
    assert _checksums(cs_project["root"]) == before  # inputs untouched
    source = Dataset.load(cs_project["cs"])
    result = Dataset.load(out / "particles.cs")
    assert np.array_equal(np.asarray(result["uid"]), np.asarray(source["uid"]))
    _check_alignment_dtypes(result)
    _check_cs_against_star(result, out / "particles.star", source)
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "report.json"):
        assert (out / name).stat().st_size > 0


def test_offline_refuses_server_options_and_missing_output(cs_project, tmp_path, capsys):
    assert cli.main(["--cs", str(cs_project["cs"]), "--project", "P3", "--o", str(tmp_path / "o")]) == 2
    assert "offline" in capsys.readouterr().err
    assert cli.main(["--cs", str(cs_project["cs"])]) == 2
    assert "--o" in capsys.readouterr().err
    assert cli.main(["--cs", str(tmp_path / "nope.cs"), "--o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


# --- server mode -----------------------------------------------------------------------------------
def test_server_round_trip_exact_calls(cs_project, tiny_weights, tmp_path):
    fake = FakeServer(cs_project["root"], cs_project["cs"], tmp_path / "server")
    out = tmp_path / "work"
    result = run_in_cryosparc(fake, PROJECT, WORKSPACE, f"{SOURCE}.particles", out_dir=out, weights=str(tiny_weights),
                              **JOB_KW)
    assert result.external_job == EXT and result.image_source == "mounted"
    # junk.png (a fourth plot) when refinement's global passes ran, as the engine writes it
    plots = 4 if (out / "junk.png").is_file() else 3
    assert fake.names() == ["find_job", "load_output", "project_dir", "create_external_job", "connect_input", "start",
                            "add_output", "save_output", "upload_mrc", "upload_mrc", "upload_mrc", "add_output",
                            "save_output", *["log_plot"] * plots, "set_tile_image", "stop"]
    calls = [kw for name, kw in fake.calls if name != "log"]
    assert calls[0] == {"project": PROJECT, "job": SOURCE}
    assert calls[1] == {"project": PROJECT, "job": SOURCE, "output": "particles", "slots": "all"}
    assert calls[3]["project"] == PROJECT and calls[3]["workspace"] == WORKSPACE
    assert calls[4] == {"project": PROJECT, "job": EXT, "input_name": "input_particles", "source_job": SOURCE,
                        "source_output": "particles", "slots": ["blob", "?ctf"]}
    source = Dataset.load(cs_project["cs"])
    part = calls[6]
    assert (part["type"], part["name"], part["slots"], part["passthrough"]) == (
        "particle", "particles", ["alignments3D"], "input_particles")
    assert np.array_equal(np.asarray(part["alloc"]["uid"]), np.asarray(source["uid"]))
    assert calls[7] == {"project": PROJECT, "job": EXT, "name": "particles"}
    assert [c["filename"] for c in calls[8:11]] == ["cryofastar_map.mrc", "cryofastar_map_half_A.mrc",
                                                    "cryofastar_map_half_B.mrc"]
    vol_call = calls[11]
    assert (vol_call["type"], vol_call["name"], vol_call["passthrough"], vol_call["alloc"]) == ("volume", "volume", None, 1)
    assert [s["name"] for s in vol_call["slots"]] == ["map", "map_half_A", "map_half_B"]
    assert calls[12] == {"project": PROJECT, "job": EXT, "name": "volume"}
    # junk.png when refinement's global passes ran (as the engine writes it)
    pngs = ["fsc.png", "viewing_directions.png", "confidence.png"] + (["junk.png"] if (out / "junk.png").is_file() else [])
    k = 13 + len(pngs)
    assert [c["image"] for c in calls[13:k]] == pngs
    assert "frequency" in calls[13]["raw_data"]
    verdict = json.loads((out / "report.json").read_text())["quality"]["verdict"]
    assert f"pose quality: {verdict.upper()}" in calls[13]["text"]
    assert calls[k] == {"project": PROJECT, "job": EXT, "image": "cryosparc_tile.png"}
    assert calls[k + 1] == {"project": PROJECT, "job": EXT, "error": ""}

    # The saved particles: only uid + alignments3D (the rest is passthrough), dtypes of CryoSPARC, values of the engine.
    saved = fake.saved["particles"]
    assert set(saved.fields()) == {"uid"} | {f[0] for f in ALIGNMENTS3D}
    assert np.array_equal(np.asarray(saved["uid"]), np.asarray(source["uid"]))
    _check_alignment_dtypes(saved)
    engine = Dataset.load(out / "particles.cs")
    for f in saved.fields():
        assert np.array_equal(np.asarray(saved[f]), np.asarray(engine[f])), f
    _check_cs_against_star(engine, out / "particles.star", source)

    vol = fake.saved["volume"]
    assert len(vol) == 1
    for slot, local in (("map", "map.mrc"), ("map_half_A", "half1.mrc"), ("map_half_B", "half2.mrc")):
        assert vol[f"{slot}/path"][0] == f"{EXT}/cryofastar_{slot}.mrc"
        assert tuple(vol[f"{slot}/shape"][0]) == (BOX, BOX, BOX)
        assert vol[f"{slot}/psize_A"][0] == pytest.approx(3.0)
        _, uploaded = cs_mrc.read(str(tmp_path / "server" / vol[f"{slot}/path"][0]))
        with mrcfile.open(out / local) as m:
            assert np.allclose(uploaded, m.data)

    logs = [kw for name, kw in fake.calls if name == "log"]
    progress = [kw for kw in logs if kw["name"] == "progress_poses"]
    assert progress and progress[-1]["text"].endswith(f"100% ({N}/{N})")
    # Refinement is on by default: its passes report progress, and its last maps are the job's maps.
    assert any(kw["name"] == "progress_refine 3/3" for kw in logs), {kw["name"] for kw in logs}
    assert all(kw["job"] == EXT and kw["project"] == PROJECT for kw in logs)
    # The pose-quality verdict is the job log's last line, where the user looks.
    assert logs[-1]["text"].startswith(f"POSE QUALITY: {verdict.upper()}: ")


def _secret_env(monkeypatch) -> None:
    monkeypatch.setenv("CRYOSPARC_BASE_URL", "http://cryosparc.invalid:39000")
    monkeypatch.setenv("CRYOSPARC_EMAIL", "lab@example.org")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", SECRET)
    for var in ("CRYOSPARC_MASTER_HOSTNAME", "CRYOSPARC_BASE_PORT"):
        monkeypatch.delenv(var, raising=False)


def _assert_nowhere(secret_forms: list[str], texts: list[str], folders: list[Path]) -> None:
    for s in secret_forms:
        for t in texts:
            assert s not in t
        for folder in folders:
            for p in folder.rglob("*"):
                if p.is_file():
                    assert s.encode() not in p.read_bytes(), p


def _secret_forms() -> list[str]:
    return [SECRET, hashlib.sha256(SECRET.encode()).hexdigest()]


def test_server_cli_streams_images_and_never_leaks_the_password(cs_project, tiny_weights, tmp_path, monkeypatch, capsys,
                                                                caplog):
    _secret_env(monkeypatch)
    caplog.set_level("DEBUG")
    fake = FakeServer(cs_project["root"], cs_project["cs"], tmp_path / "server", mounted=False)
    seen = []

    def connect(creds):
        seen.append(creds)
        return fake

    out = tmp_path / "work"
    rc = cli.main(["--project", PROJECT, "--workspace", WORKSPACE, "--particles", f"{SOURCE}.particles",
                   "--o", str(out), "--weights", str(tiny_weights), "--keep-fraction", "0.9", *JOB_ARGS], connect=connect)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert seen[0].password == SECRET and seen[0].email == "lab@example.org"  # the password was used ...
    assert SECRET not in repr(seen[0])
    assert ("download_file", {"project": PROJECT, "path": STACK}) in fake.calls  # ... images came through the API ...
    assert not (out / "cryosparc_input" / "images").exists()  # ... and the temporary copy is gone
    source = Dataset.load(cs_project["cs"])
    saved = fake.saved["particles"]
    assert len(saved) == round(0.9 * N)
    assert set(np.asarray(saved["uid"]).tolist()) < set(np.asarray(source["uid"]).tolist())
    assert fake.calls[-1] == ("stop", {"project": PROJECT, "job": EXT, "error": ""})
    # ... and is nowhere: not in stdout/stderr, log records, anything sent to the server, or any file.
    texts = [captured.out, captured.err, caplog.text, repr(fake.calls)]
    _assert_nowhere(_secret_forms(), texts, [out, tmp_path / "server"])


@pytest.mark.parametrize("fail_in", ["start", "find_job"])
def test_server_errors_quoting_the_password_are_redacted(cs_project, tmp_path, monkeypatch, capsys, caplog, fail_in):
    _secret_env(monkeypatch)
    fake = FakeServer(cs_project["root"], cs_project["cs"], tmp_path / "server", fail_in=fail_in,
                      fail_text=f"401 for lab@example.org:{SECRET} ({hashlib.sha256(SECRET.encode()).hexdigest()})")
    rc = cli.main(["--project", PROJECT, "--workspace", WORKSPACE, "--particles", f"{SOURCE}.particles",
                   "--o", str(tmp_path / "work"), *JOB_ARGS], connect=lambda creds: fake)
    captured = capsys.readouterr()
    assert rc != 0
    assert "401 for lab@example.org:<redacted>" in captured.err
    if fail_in == "start":  # the External job exists by then: it is marked failed, with the redacted reason
        name, kw = fake.calls[-1]
        assert name == "stop" and "401" in kw["error"] and "<redacted>" in kw["error"]
    else:
        assert "create_external_job" not in fake.names()
    _assert_nowhere(_secret_forms(), [captured.out, captured.err, caplog.text, repr(fake.calls)], [tmp_path])


def test_engine_failure_marks_the_job_failed_with_the_reason(cs_project, tiny_weights, tmp_path, capsys):
    fake = FakeServer(cs_project["root"], cs_project["bad_cs"], tmp_path / "server")
    rc = cli.main(["--project", PROJECT, "--workspace", WORKSPACE, "--particles", "J43.particles",
                   "--url", "http://cryosparc.invalid:39000", "--o", str(tmp_path / "work"), "--weights", str(tiny_weights),
                   *JOB_ARGS], connect=lambda creds: fake)
    err = capsys.readouterr().err
    assert rc == 2  # InputError from the engine
    assert fake.names() == ["find_job", "load_output", "project_dir", "create_external_job", "connect_input", "start",
                            "stop"]
    error = fake.calls[-1][1]["error"]
    assert error.startswith("CryoFastAR failed:") and "blob/idx" in error
    assert "blob/idx" in err
    assert "particles" not in fake.saved and "volume" not in fake.saved


def test_bad_references_fail_before_any_job_is_created(cs_project, tmp_path, capsys):
    fake = FakeServer(cs_project["root"], cs_project["cs"], tmp_path / "server")
    args = ["--project", PROJECT, "--workspace", WORKSPACE, "--url", "http://x.invalid:39000", "--o", str(tmp_path / "w")]
    assert cli.main([*args, "--particles", "J42"], connect=lambda c: fake) == 2
    assert "J42.particles" in capsys.readouterr().err
    assert cli.main([*args, "--particles", "J42.volumes"], connect=lambda c: fake) == 2
    assert "no output 'volumes'" in capsys.readouterr().err
    assert cli.main([*args, "--particles", "J42.particles", "--views", "2"], connect=lambda c: fake) == 2
    assert "--views" in capsys.readouterr().err
    assert "create_external_job" not in fake.names()


def test_every_further_class_is_a_volume_output(cs_project, tmp_path):
    """With several classes, class 1 is the ``volume`` output and every further class (with maps) one more
    volume output of its own, pointing at its uploaded map and half maps."""
    from types import SimpleNamespace

    from cryofastar_core.io import write_map
    from plugin.connector import _save_class_volumes

    out = tmp_path / "work"
    out.mkdir()
    rng = np.random.default_rng(0)
    for name in ("class002_map.mrc", "class002_half1.mrc", "class002_half2.mrc"):
        write_map(out / name, rng.standard_normal((BOX, BOX, BOX)).astype(np.float32), 3.0)
    classes = [{"number": 1, "particles": 30, "sink": False, "files": ["map.mrc"]},
               {"number": 2, "particles": 9, "sink": True, "files": ["class002_map.mrc"]},
               {"number": 3, "particles": 1, "sink": True, "files": []}]   # too small to have maps
    fake = FakeServer(cs_project["root"], cs_project["cs"], tmp_path / "server")
    assert _save_class_volumes(fake, PROJECT, EXT, out, SimpleNamespace(classes=classes)) == ["volume_class002"]
    added = [kw for name, kw in fake.calls if name == "add_output"]
    assert [(a["name"], a["title"]) for a in added] == [("volume_class002", "CryoFastAR class 2 (9 particles, sink)")]
    vol = fake.saved["volume_class002"]
    for slot, local in (("map", "class002_map.mrc"), ("map_half_A", "class002_half1.mrc"),
                        ("map_half_B", "class002_half2.mrc")):
        assert vol[f"{slot}/path"][0] == f"{EXT}/cryofastar_volume_class002_{slot}.mrc"
        _, uploaded = cs_mrc.read(str(tmp_path / "server" / vol[f"{slot}/path"][0]))
        with mrcfile.open(out / local) as m:
            assert np.allclose(uploaded, m.data)


def test_classes_reach_the_cs_as_cryosparc_numbers_them(cs_project, tmp_path):
    """With several classes a CryoSPARC input's particles.cs carries each particle's class in
    ``alignments3D/class``, from 0 as CryoSPARC numbers 3D classes (the STAR's rlnClassNumber is from 1)."""
    from cryofastar_core.io import CONFIDENCE_LABEL, read_particles
    from cryofastar_core.job.outputs import CLASS_LABEL, _write_particles

    ps = read_particles(cs_project["cs"], cs_project["root"])
    n = len(ps)
    classes = np.arange(n) % 3 + 1
    keep = np.ones(n, dtype=bool)
    keep[::5] = False
    R = geometry.random_rotations(n, torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    _write_particles(tmp_path, "particles", ps, R, np.zeros((n, 2)), np.arange(n) % 2 + 1, keep,
                     {CONFIDENCE_LABEL: np.full(n, 0.5), CLASS_LABEL: classes})
    cs = Dataset.load(tmp_path / "particles.cs")
    assert cs["alignments3D/class"].dtype == np.uint32
    assert np.array_equal(np.asarray(cs["alignments3D/class"]), classes[keep] - 1)
    star = starfile.read(tmp_path / "particles.star", always_dict=True)["particles"]
    assert np.array_equal(star[CLASS_LABEL].to_numpy(), classes[keep])
