"""The RELION External-job adapter inside real RELION projects, run by RELION's own pipeliner, for every
RELION version present (3.1 from Debian; 5.0 and 4.0 built from ../shared/relion/: tests/relion_hosts.py).

A temporary project gets simulated particles imported by a real Import job; our External job (the
deploy/relion wrapper script running ``python -m relion_external.main``) is added with
``relion_pipeliner --addJob External`` (``relion.external`` in 4.0/5.0) and run with ``--RunJobs``. Then RELION's own programs consume
its outputs (``relion_reconstruct``, a local-search ``relion_refine_mpi --auto_refine``), and the failure,
abort and queue-submission paths go through the same pipeliner. Tiny untrained weights: this tests the
plumbing, not accuracy.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryofastar_core.cli.simulate import SimulateConfig, simulate
from cryofastar_core.io import read_particles
from relion_external.markers import ABORT_NOW, ABORTED, FAILURE, SUCCESS
from relion_external.nodes import node_type
from relion_hosts import STATUS_NAMES, RelionHost, hosts

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "deploy" / "relion" / "cryofastar-relion-wrapper.sh"
TEMPLATE = REPO / "deploy" / "relion" / "slurm_external_template.sh"
BOX = 32
MINIMAL_PIPELINE = "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n\n"
# Files RELION itself keeps in the project folder (everything else must stay untouched by our job).
RELION_OWN = ("default_pipeline.star", ".pipeline_has_changed", "pipeline_*.log", ".gui_*", ".relion_lock*")

pytestmark = pytest.mark.relion


@pytest.fixture(scope="module", params=hosts(), ids=lambda h: h.name)
def host(request) -> RelionHost:
    return request.param


def _env(host: RelionHost) -> dict[str, str]:
    env = dict(os.environ)
    if host.bin_dir is not None:  # this version's programs first, whatever else is installed
        env["PATH"] = os.pathsep.join([str(host.bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CRYOFASTAR_RELION_EXE"] = f"{sys.executable} -m relion_external.main"
    env["OMP_NUM_THREADS"] = "1"
    # Let a root CI container run OpenMPI, and more ranks than cores.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    return env


def _pipeliner(host: RelionHost, project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = host.exe("relion_pipeliner")
    proc = subprocess.run(["timeout", str(int(timeout)), exe, *args], cwd=project, env=_env(host), capture_output=True,
                          text=True, timeout=timeout + 30)
    assert proc.returncode == 0, f"relion_pipeliner {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _add_external(host: RelionHost, project: Path, options: dict[str, str]) -> str:
    """``relion_pipeliner --addJob External`` (4.0/5.0: ``relion.external``); returns the new job folder
    (``External/jobNNN/``)."""
    before = set(_processes(project))
    _pipeliner(host, project, "--addJob", host.job_type("external"), "--addJobOptions",
               ";".join(f"{k} == {v}" for k, v in options.items()))
    new = [p for p in _processes(project) if p not in before]
    assert len(new) == 1 and new[0].startswith("External/"), new
    return new[0]


def _external_options(in_part: str, weights: Path | str, **params: str) -> dict[str, str]:
    opts = {"fn_exe": str(WRAPPER), "in_part": in_part, "nr_threads": "1"}
    settings = {"weights": str(weights), "views": "16", "candidates": "3", "anchors": "4", **params}
    for i, (label, value) in enumerate(settings.items(), start=1):
        opts[f"param{i}_label"], opts[f"param{i}_value"] = label, value
    return opts


def _processes(project: Path) -> dict[str, str]:
    """Process name -> status name (``Succeeded``, ``Failed``...), from 3.1's integers or 4.0/5.0's labels."""
    tables = starfile.read(project / "default_pipeline.star", always_dict=True)
    if "pipeline_processes" not in tables:
        return {}
    t = tables["pipeline_processes"]
    if "rlnPipeLineProcessStatusLabel" in t:
        return dict(zip(t["rlnPipeLineProcessName"], t["rlnPipeLineProcessStatusLabel"]))
    return dict(zip(t["rlnPipeLineProcessName"], (STATUS_NAMES[int(s)] for s in t["rlnPipeLineProcessStatus"])))


def _nodes(project: Path) -> dict[str, int | str]:
    """Node name -> type as the pipeline holds it: 3.1's integer, 4.0/5.0's label."""
    t = starfile.read(project / "default_pipeline.star", always_dict=True)["pipeline_nodes"]
    if "rlnPipeLineNodeTypeLabel" in t:
        return dict(zip(t["rlnPipeLineNodeName"], t["rlnPipeLineNodeTypeLabel"]))
    return dict(zip(t["rlnPipeLineNodeName"], t["rlnPipeLineNodeType"].astype(int)))


def _expected_type(host: RelionHost, kind: str) -> int | str:
    code, label = node_type(kind, host.major)
    return code if host.major < 4 else label


def _snapshot(project: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(project)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in project.rglob("*") if p.is_file()}


def _exit_markers(job: Path) -> list[str]:
    return sorted(m for m in (SUCCESS, FAILURE, ABORTED) if (job / m).exists())


@pytest.fixture(scope="module")
def project(host, tmp_path_factory, tiny_map_file) -> Path:
    """A RELION project with 80 simulated particles imported by a real Import job (Import/job001/)."""
    proj = tmp_path_factory.mktemp(f"{host.name}_project")
    (proj / "default_pipeline.star").write_text(MINIMAL_PIPELINE)
    # Simulated straight into the project folder, so image names are relative to it, as RELION expects.
    simulate(SimulateConfig(out_dir=proj, n=80, box=BOX, snr=1.0, seed=3, map_path=tiny_map_file, ctf=True,
                            max_shift=1.0))
    _pipeliner(host, proj, "--addJob", host.job_type("import"), "--addJobOptions",
               "do_raw == No;do_other == Yes;fn_in_other == particles.star;node_type == Particles STAR file (.star)")
    _pipeliner(host, proj, "--RunJobs", "Import/job001/", "--sec_wait_after", "1")
    assert (proj / "Import/job001/particles.star").exists() and _processes(proj)["Import/job001/"] == "Succeeded"
    return proj


@pytest.fixture(scope="module")
def external_job(host, project, tiny_weights) -> tuple[str, dict, dict]:
    """Our External job run by the pipeliner: ``(job folder, project snapshot before, after)``.

    An empty ``gpu`` value (a bare flag), unknown flags and an injected ``--pipeline_control`` ride along,
    as RELION emits them."""
    assert os.access(WRAPPER, os.X_OK), f"{WRAPPER} must be executable (git: mode 100755)"
    # Feed-forward only (refine_iters 0): these tests are about the adapter and RELION reading our outputs;
    # refinement inside the job has its own tests (tests/test_job.py, tests/test_refine.py).
    opts = _external_options("Import/job001/particles.star", tiny_weights, gpu="", device="cpu", refine_iters="0")
    opts["other_args"] = "--unknown_flag 3 --bare --pipeline_control External/job002/"
    job = _add_external(host, project, opts)
    before = _snapshot(project)
    _pipeliner(host, project, "--RunJobs", job, "--sec_wait_after", "1")
    return job, before, _snapshot(project)


def test_external_job_succeeds_and_its_nodes_enter_the_pipeline(host, project, external_job):
    job, before, after = external_job
    out = project / job
    assert _processes(project)[job] == "Succeeded", (out / "run.err").read_text()
    assert _exit_markers(out) == [SUCCESS]
    nodes = _nodes(project)
    for name, kind in (("particles.star", "particles"), ("map.mrc", "map"), ("half1.mrc", "halfmap")):
        assert nodes[f"{job}{name}"] == _expected_type(host, kind), (name, nodes)
        # What the GUI's file browser lists.
        folder = host.node_dir(*node_type(kind, host.major))
        assert (project / ".Nodes" / folder / f"{job}{name}").exists(), (folder, name)
    for name in ("particles.star", "map.mrc", "half1.mrc", "half2.mrc", "fsc.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    run_out = (out / "run.out").read_text()
    assert "poses: 80/80" in run_out and "reconstruct: 80/80" in run_out and "ignoring --unknown_flag --bare" in run_out
    assert "error" not in (out / "run.err").read_text().lower()
    # The pose-quality verdict is the last line of run.out and is appended to the job's note, after what
    # RELION itself wrote there (the command it ran).
    verdict = json.loads((out / "report.json").read_text())["quality"]["verdict"]
    assert run_out.strip().splitlines()[-1].startswith(f"cryofastar-relion: POSE QUALITY: {verdict.upper()}: ")
    note = (out / "note.txt").read_text().splitlines()
    ours = [i for i, line in enumerate(note) if "POSE QUALITY" in line]
    assert ours and ours[0] > 0 and not any("CryoFastAR" in line for line in note[:ours[0] - 1]), note

    # Nothing written outside --o, except RELION's own pipeline bookkeeping.
    changed = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    foreign = [p for p in changed if not p.startswith(job) and not p.startswith(".Nodes/")
               and not any(fnmatch.fnmatch(Path(p).name, pat) for pat in RELION_OWN)]
    assert foreign == []


def test_relion_reconstruct_reads_our_particles(host, project, external_job):
    job = external_job[0]
    exe = host.exe("relion_reconstruct")
    proc = subprocess.run([exe, "--i", f"{job}particles.star", "--o", "rec.mrc", "--ctf"], cwd=project, env=_env(host),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = mrcfile.read(project / "rec.mrc")
    ours = mrcfile.read(project / job / "map.mrc")
    assert rec.shape == ours.shape == (BOX, BOX, BOX)
    # The same images, poses, shifts and CTFs through RELION's reconstruction give the same map as ours.
    a, b = rec - rec.mean(), ours - ours.mean()
    assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.9


def _directions(rotations: np.ndarray) -> np.ndarray:
    # Our R maps image-frame to map-frame coordinates: the projection direction is R·z.
    return rotations[:, :, 2]


def test_relion_auto_refine_runs_local_searches_from_our_poses(host, project, external_job):
    job = external_job[0]
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun missing (Debian: openmpi-bin, installed with relion)"
    (project / "Refine3D/local").mkdir(parents=True)
    # Initial sampling = local-search threshold (hp3): local searches around our poses from iteration 1.
    cmd = [mpirun, "-n", "3", host.exe("relion_refine_mpi"), "--o", "Refine3D/local/run", "--auto_refine",
           "--split_random_halves", "--i", f"{job}particles.star", "--ref", f"{job}map.mrc", "--firstiter_cc",
           "--ini_high", "20", "--particle_diameter", "80", "--ctf", "--flatten_solvent", "--zero_mask",
           "--healpix_order", "3", "--auto_local_healpix_order", "3", "--oversampling", "1", "--offset_range", "2",
           "--offset_step", "1", "--sym", "C1", "--pad", "1", "--auto_iter_max", "2", "--j", "1", "--pool", "10",
           "--dont_combine_weights_via_disc"]
    proc = subprocess.run(cmd, cwd=project, env=_env(host), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "local searches= true" in proc.stdout
    for name in ("run_it001_data.star", "run_it001_half1_class001.mrc", "run_it002_half2_class001.mrc"):
        assert (project / "Refine3D/local" / name).exists(), name

    ours = read_particles(project / job / "particles.star", project)
    refined = read_particles(project / "Refine3D/local/run_it001_data.star", project)
    order = dict(zip(refined.table["rlnImageName"], range(len(refined))))
    idx = np.array([order[n] for n in ours.table["rlnImageName"]])
    # Our half-set split is kept (gold-standard halves stay independent of how we reconstructed them).
    np.testing.assert_array_equal(refined.table["rlnRandomSubset"].to_numpy()[idx], ours.table["rlnRandomSubset"])
    cosang = np.clip(np.sum(_directions(ours.rotations) * _directions(refined.rotations[idx]), axis=1), -1, 1)
    angle = np.degrees(np.arccos(cosang))
    # Local: every viewing direction stays within the prior's +-3 sigma (sigma = 2 x 7.5 deg) of ours; a global
    # search would scatter them over the sphere (median ~90 deg).
    assert angle.max() < 45, np.sort(angle)[-5:]


@pytest.mark.parametrize("case", ["missing_stack", "missing_weights"])
def test_bad_input_marks_the_job_failed_with_the_reason_in_run_err(case, host, project, tiny_weights):
    # (A missing input STAR cannot be tested here: the pipeliner waits for input nodes to appear.)
    if case == "missing_stack":
        bad = project / "bad" / "particles.star"
        bad.parent.mkdir(exist_ok=True)
        bad.write_text((project / "particles.star").read_text().replace("particles.mrcs", "gone.mrcs"))
        opts = _external_options("bad/particles.star", tiny_weights, device="cpu")
    else:
        opts = _external_options("Import/job001/particles.star", project / "nope.pt", device="cpu")
    job = _add_external(host, project, opts)
    _pipeliner(host, project, "--RunJobs", job, "--sec_wait_after", "1", timeout=60)
    out = project / job
    assert _processes(project)[job] == "Failed"
    assert _exit_markers(out) == [FAILURE]
    err = (out / "run.err").read_text()
    assert "cryofastar-relion: error:" in err and "Fix:" in err and "Traceback" not in err, err
    assert ("gone.mrcs" if case == "missing_stack" else "nope.pt") in err
    assert not (out / "particles.star").exists() and not (out / "RELION_OUTPUT_NODES.star").exists()
    assert not any(n.startswith(job) for n in _nodes(project))


def test_abort_now_stops_the_running_job(host, tmp_path, tiny_map_file, tiny_weights):
    # Enough particles that the job is still estimating poses when the abort request arrives; in a project of
    # its own, so that its image names cannot resolve to another stack of the same name.
    project = tmp_path / "project"
    project.mkdir()
    (project / "default_pipeline.star").write_text(MINIMAL_PIPELINE)
    simulate(SimulateConfig(out_dir=project, n=3000, box=BOX, snr=1.0, seed=4, map_path=tiny_map_file, ctf=False))
    job = _add_external(host, project, _external_options("particles.star", tiny_weights, device="cpu"))
    out = project / job
    exe = host.exe("relion_pipeliner")
    proc = subprocess.Popen(["timeout", "150", exe, "--RunJobs", job, "--sec_wait_after", "1"], cwd=project,
                            env=_env(host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "poses:" not in _read(out / "run.out"):
            assert proc.poll() is None, "the pipeliner stopped before the job made progress"
            time.sleep(0.1)
        assert "poses:" in _read(out / "run.out"), "no progress line in run.out"
        (out / ABORT_NOW).touch()
        t_abort = time.time()
        while time.time() - t_abort < 30 and not (out / ABORTED).exists():
            time.sleep(0.05)
        reaction = time.time() - t_abort
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / ABORTED).exists(), _read(out / "run.err")
    assert reaction < 20  # "within seconds": the adapter polls between batches of 16 particles
    assert _processes(project)[job] == "Aborted"
    assert _exit_markers(out) == [ABORTED] and not (out / ABORT_NOW).exists()
    for name in ("particles.star", "map.mrc", "report.json", "RELION_OUTPUT_NODES.star"):
        assert not (out / name).exists(), name
    assert "poses: 3000/3000" not in _read(out / "run.out")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_queue_submission_through_the_slurm_template(host, project, tiny_weights, tmp_path):
    # A stand-in for sbatch that honours the template's --output/--error lines and runs the script.
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text("#!/bin/bash\nset -e\n"
                           "out=$(sed -n 's/^#SBATCH --output=//p' \"$1\")\n"
                           "err=$(sed -n 's/^#SBATCH --error=//p' \"$1\")\n"
                           "bash \"$1\" >>\"$out\" 2>>\"$err\"\n")
    fake_sbatch.chmod(0o755)
    opts = _external_options("Import/job001/particles.star", tiny_weights, device="cpu")
    opts.update(do_queue="Yes", queuename="short", qsub=str(fake_sbatch), qsubscript=str(TEMPLATE), min_dedicated="1")
    job = _add_external(host, project, opts)
    _pipeliner(host, project, "--RunJobs", job, "--sec_wait_after", "1")
    out = project / job
    script = (out / "run_submit.script").read_text()
    assert "XXX" not in script
    command_lines = [line for line in script.splitlines() if str(WRAPPER) in line]
    assert len(command_lines) == 1 and command_lines[0].startswith(f"{WRAPPER} --o {job} --in_parts ")
    assert f"#SBATCH --output={job}run.out" in script and f"#SBATCH --error={job}run.err" in script
    assert subprocess.run(["bash", "-n", str(out / "run_submit.script")]).returncode == 0
    assert _processes(project)[job] == "Succeeded", _read(out / "run.err")
    assert _exit_markers(out) == [SUCCESS]
    assert "poses: 80/80" in _read(out / "run.out")
    assert _nodes(project)[f"{job}particles.star"] == _expected_type(host, "particles")
