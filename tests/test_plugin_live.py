"""The CryoSPARC connector in server mode through the real cryosparc-tools 5.x client.

Nothing of the connector is faked here: ``cryofastar-cryosparc`` (and the notebook entry
``run_in_cryosparc``) log in with a real ``cryosparc.tools.CryoSPARC``, whose ``APIClient`` reads
``/openapi.json`` and sends every call over ``httpx``. Only the network is replaced: the client's
``httpx.Client`` gets an in-process transport answering as a CryoSPARC v5 instance would
(``tests/_cryosparc_instance.py``: the schema and the argument checks come from the tools' own v5 API
stub and pydantic models). A wrong argument name or type in a connector call therefore fails here the
way it would fail against a real instance: in the client (``TypeError``) or with the server's 422.

What a CryoSPARC user sees is checked on the instance's side: the job's status history, its inputs and
outputs (decoded with the real ``Dataset``), the maps written into the job folder, the event log with the
plots and the verdict, and the job card's tile image.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
from cryosparc import mrc as cs_mrc
from cryosparc.dataset import Dataset
from cryosparc.errors import APIError
from cryosparc.tools import CryoSPARC
from matplotlib.image import imread

from _cryosparc_instance import (BASE_URL, ENDPOINTS, FakeCryoSPARC, image_events, particle_output,
                                 text_events)
from cryofastar_core.runtime.errors import InputError
from plugin import cli, run_in_cryosparc
from plugin.connector import TILE_FILE
from plugin.server import CryoSPARCServer
from test_plugin import (ALIGNMENTS3D, BOX, JOB_ARGS, JOB_KW, N, PROJECT, SECRET, SOURCE, WORKSPACE,
                         _check_alignment_dtypes, _check_cs_against_star, cs_project)

EMAIL = "lab@example.org"
MASTER_DIR = "/nonexistent/cryosparc/P3"  # the project folder on the master: not mounted here
assert cs_project  # the shared particle set (a module-scoped fixture of test_plugin)


def _instance(cs_project: dict, particles_cs: Path) -> FakeCryoSPARC:
    source = Dataset.load(particles_cs)
    return FakeCryoSPARC(email=EMAIL, password=SECRET, project=PROJECT, project_dir=MASTER_DIR,
                         files=cs_project["root"], sources={SOURCE: {"particles": (particle_output(source), source)}})


@pytest.fixture(scope="module")
def live(cs_project, tiny_weights, tmp_path_factory) -> SimpleNamespace:
    """One full ``cryofastar-cryosparc`` run against the in-process instance; images streamed through the API."""
    instance = _instance(cs_project, cs_project["cs"])
    out = tmp_path_factory.mktemp("live") / "work"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, instance.serving():
        for var, value in (("CRYOSPARC_BASE_URL", BASE_URL), ("CRYOSPARC_EMAIL", EMAIL),
                           ("CRYOSPARC_PASSWORD", SECRET)):
            mp.setenv(var, value)
        for var in ("CRYOSPARC_MASTER_HOSTNAME", "CRYOSPARC_BASE_PORT"):
            mp.delenv(var, raising=False)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli.main(["--project", PROJECT, "--workspace", WORKSPACE, "--particles", f"{SOURCE}.particles",
                           "--o", str(out), "--weights", str(tiny_weights), *JOB_ARGS])
    assert rc == 0, stderr.getvalue()
    (ext,) = instance.external_jobs()
    return SimpleNamespace(instance=instance, out=out, ext=ext, job=instance.job(ext), stdout=stdout.getvalue(),
                           stderr=stderr.getvalue(), source=Dataset.load(cs_project["cs"]))


# --- the happy path, as the instance saw it ------------------------------------------------------------
def test_live_run_uses_every_endpoint_and_ends_completed(live):
    inst, job = live.instance, live.job
    assert all(c.status == 200 for c in inst.calls), [(c.name, c.status) for c in inst.calls if c.status != 200]
    names = inst.names()
    assert names[:3] == ["login", "users.me", "config.get_version"]
    # Every endpoint the instance serves is used (no dead stubs); mark_failed only on the failure path.
    assert set(inst.names(skip_logs=False)) == set(ENDPOINTS) - {"jobs.mark_failed"}
    assert "projects.download_file" in names  # the master's folder is not mounted here: images streamed
    assert names.index("jobs.mark_running") < names.index("jobs.save_output")
    assert names[-1] == "jobs.mark_completed"
    assert job.statuses == ["building", "running", "completed"] and job.model.status == "completed"
    assert not job.model.errors_run
    assert job.model.title == "CryoFastAR poses" and f"{SOURCE}.particles" in job.model.description
    assert f"External job {PROJECT} {live.ext}:" in live.stdout
    # The input as CryoSPARC records it: blob required, ctf optional, connected to the source output.
    inp = job.model.spec.inputs.root["input_particles"]
    assert inp.type == "particle" and [(s.name, s.required) for s in inp.slots] == [("blob", True), ("ctf", False)]
    assert [(c.job_uid, c.output) for c in inp.connections] == [(SOURCE, "particles")]
    assert job.model.parents == [SOURCE]


def test_live_password_travels_only_hashed_and_only_in_the_login_form(live):
    hashed = hashlib.sha256(SECRET.encode()).hexdigest().encode()
    carrying = []
    for request in live.instance.requests:
        sent = str(request.url).encode() + repr(request.headers.multi_items()).encode() + request.content
        assert SECRET.encode() not in sent and SECRET.encode("latin-1", "replace") not in sent
        if hashed in sent:
            carrying.append(request.url.path)
    assert carrying == ["/api/cmd/login"]
    for p in live.out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes() and hashed not in p.read_bytes(), p
    assert SECRET not in live.stdout + live.stderr


def test_live_particles_output_is_the_engines_alignments_in_real_dataset_bytes(live):
    job, source = live.job, live.source
    spec = job.model.spec.outputs.root["particles"]
    assert (spec.type, spec.passthrough) == ("particle", "input_particles")
    assert {r.name for r in spec.results if r.passthrough} == {"blob", "ctf", "location"}
    saved = job.outputs["particles"]  # decoded from the bytes the client sent, with the real Dataset
    assert set(saved.fields()) == {"uid"} | {f[0] for f in ALIGNMENTS3D}
    assert np.array_equal(np.asarray(saved["uid"]), np.asarray(source["uid"]))
    _check_alignment_dtypes(saved)
    engine = Dataset.load(live.out / "particles.cs")
    for f in saved.fields():
        assert np.array_equal(np.asarray(saved[f]), np.asarray(engine[f])), f
    assert np.abs(np.asarray(saved["alignments3D/pose"])).max() > 0  # real poses, not the allocation's zeros
    assert np.allclose(np.asarray(saved["alignments3D/psize_A"]), np.asarray(source["blob/psize_A"]))
    _check_cs_against_star(engine, live.out / "particles.star", source)
    assert spec.num_items == N and live.instance.written[f"{live.ext}/particles.cs"]


def test_live_volume_output_points_at_the_uploaded_maps(live, tmp_path):
    job, written = live.job, live.instance.written
    spec = job.model.spec.outputs.root["volume"]
    assert spec.type == "volume" and [(r.name, r.dtype) for r in spec.results] == [
        ("map", "volume"), ("map_half_A", "volume"), ("map_half_B", "volume")]
    vol = job.outputs["volume"]
    assert len(vol) == 1
    for slot, local in (("map", "map.mrc"), ("map_half_A", "half1.mrc"), ("map_half_B", "half2.mrc")):
        path = vol[f"{slot}/path"][0]
        assert path == f"{live.ext}/cryofastar_{slot}.mrc"
        assert tuple(vol[f"{slot}/shape"][0]) == (BOX, BOX, BOX)
        assert vol[f"{slot}/psize_A"][0] == pytest.approx(3.0)
        (tmp_path / "uploaded.mrc").write_bytes(written[path])  # cryosparc.mrc reads real files only
        header, uploaded = cs_mrc.read(str(tmp_path / "uploaded.mrc"))
        assert header.xlen / header.nx == pytest.approx(3.0)
        with mrcfile.open(live.out / local) as m:
            assert np.allclose(uploaded, m.data)


def test_live_event_log_has_progress_plots_and_the_verdict_last(live):
    job, inst, out = live.job, live.instance, live.out
    texts = [e.text for e in text_events(job)]
    # Live progress lines are updated in place (one event per stage), ending at 100 %.
    poses = [t for t in texts if t.startswith("poses:")]
    assert len(poses) == 1 and poses[0].endswith(f"100% ({N}/{N})")
    assert any(t.startswith("download:") and t.endswith("100% (1/1)") for t in texts)
    assert any(c.name == "jobs.update_event_log" for c in inst.calls)
    verdict = json.loads((out / "report.json").read_text())["quality"]["verdict"]
    assert texts[-1].startswith(f"POSE QUALITY: {verdict.upper()}: ")
    assert all(e.type == "text" for e in text_events(job))
    # The plots: each image event carries the PNG the engine wrote; the FSC one its table too.
    plots = image_events(job)
    pngs = ["fsc.png", "viewing_directions.png", "confidence.png"] + (["junk.png"] if (out / "junk.png").is_file() else [])
    titles = ["Half-map FSC", "Viewing directions", "Per-particle confidence", "Junk"][:len(pngs)]
    assert [e.text.split(" (")[0].split(":")[0] for e in plots] == titles
    assert f"pose quality: {verdict.upper()}" in plots[0].text
    for event, png in zip(plots, pngs, strict=True):
        assert event.flags == ["plots"]
        assert inst.asset_bytes(event.imgfiles[0].fileid) == (out / png).read_bytes()
        assert event.imgfiles[0].filetype == "image/png"
    fsc_assets = plots[0].imgfiles
    assert len(fsc_assets) == 2 and fsc_assets[1].filetype == "text/plain"
    assert inst.asset_bytes(fsc_assets[1].fileid).decode() == (out / "fsc.tsv").read_text()
    # Plots come before the closing summary and verdict lines.
    assert job.events.index(plots[-1]) < job.events.index(text_events(job)[-1])


def test_live_tile_image_shows_the_map(live):
    job, inst = live.job, live.instance
    (tile,) = job.model.ui_tile_images
    png = inst.asset_bytes(tile.fileid)
    assert png == (live.out / TILE_FILE).read_bytes()
    image = imread(io.BytesIO(png), format="png")
    gap = max(1, BOX // 16)
    assert image.shape[:2] == (BOX, 3 * BOX + 2 * gap)  # three projections side by side
    assert image[..., 0].std() > 0.05  # not blank


# --- failures ------------------------------------------------------------------------------------------
def _notebook_run(instance: FakeCryoSPARC, cs_project: dict, out: Path, weights: Path, particles: str,
                  **options):
    """``run_in_cryosparc`` with a real, logged-in ``CryoSPARC`` object (the notebook entry); mounted images."""
    with instance.serving():
        cs = CryoSPARC(BASE_URL, email=EMAIL, password=SECRET)
        return run_in_cryosparc(cs, PROJECT, WORKSPACE, particles, out_dir=out, project_dir=cs_project["root"],
                                weights=str(weights), **{**JOB_KW, **options})


def test_live_engine_failure_marks_the_job_failed_with_the_reason(cs_project, tiny_weights, tmp_path):
    instance = _instance(cs_project, cs_project["bad_cs"])  # blob/idx beyond the stack
    with pytest.raises(InputError, match="blob/idx"):
        _notebook_run(instance, cs_project, tmp_path / "work", tiny_weights, f"{SOURCE}.particles")
    (ext,) = instance.external_jobs()
    job = instance.job(ext)
    assert job.statuses == ["building", "running", "failed"] and job.model.has_error
    (error,) = job.model.errors_run
    assert error.message.startswith("CryoFastAR failed:") and "blob/idx" in error.message
    assert job.events[-1].type == "error" and job.events[-1].text == error.message
    assert not job.outputs and not instance.assets and not instance.written
    assert "jobs.save_output" not in instance.names()


def _unknown_api_keyword(self, project, job):
    self._cs.api.jobs.mark_running(project, job, state="running")  # the API's parameter is "status"


def _wrong_api_value(self, project, job):
    self._job(project, job).start("started")  # status must be "running" or "waiting"


def _unknown_controller_keyword(self, project, job):
    self._job(project, job).start(state="running")


@pytest.mark.parametrize("start, rejected_by, message", [
    (_unknown_api_keyword, TypeError, r"mark_running\(\) given unknown keyword arguments \(state\)"),
    (_wrong_api_value, APIError, r"code 422(.|\n)*Input should be 'running' or 'waiting'"),
    (_unknown_controller_keyword, TypeError, "unexpected keyword argument 'state'"),
], ids=["client-rejects-unknown-api-keyword", "server-rejects-wrong-value", "controller-rejects-unknown-keyword"])
def test_a_wrong_argument_in_a_connector_call_fails_the_run(cs_project, tiny_weights, tmp_path, monkeypatch, start,
                                                            rejected_by, message):
    """Proof that this transport test can fail: one call site is broken on purpose, and the real client
    (or the instance's validation) refuses it; the run fails and the External job is marked failed."""
    monkeypatch.setattr(CryoSPARCServer, "start", start)
    instance = _instance(cs_project, cs_project["cs"])
    with pytest.raises(rejected_by, match=message):
        _notebook_run(instance, cs_project, tmp_path / "work", tiny_weights, f"{SOURCE}.particles")
    (ext,) = instance.external_jobs()
    job = instance.job(ext)
    assert job.statuses == ["building", "failed"]
    assert job.model.errors_run[0].message.startswith(f"CryoFastAR failed: {rejected_by.__name__}")
    assert not job.outputs and "jobs.save_output" not in instance.names()
    sent = [c.status for c in instance.calls if c.name == "jobs.mark_running"]
    assert sent == ([422] if rejected_by is APIError else [])  # the client refuses before sending anything


def test_a_wrong_argument_type_late_in_the_run_fails_it_too(cs_project, tiny_weights, tmp_path, monkeypatch):
    """The tile image sent as its path instead of the uploaded asset: the instance answers 422 after the
    outputs were saved, and the job still ends failed with the reason."""
    def set_tile_image(self, project, job, image):
        self._cs.api.jobs.set_tile_image(project, job, str(image))

    monkeypatch.setattr(CryoSPARCServer, "set_tile_image", set_tile_image)
    instance = _instance(cs_project, cs_project["cs"])
    with pytest.raises(APIError, match="code 422"):
        _notebook_run(instance, cs_project, tmp_path / "work", tiny_weights, f"{SOURCE}.particles", refine_iters=0)
    (ext,) = instance.external_jobs()
    job = instance.job(ext)
    assert job.statuses == ["building", "running", "failed"]
    assert set(job.outputs) == {"particles", "volume"} and not job.model.ui_tile_images
    assert [c.status for c in instance.calls if c.name == "jobs.set_tile_image"] == [422]
    assert "APIError" in job.model.errors_run[0].message
    assert "projects.download_file" not in instance.names()  # the folder is mounted here: read in place

