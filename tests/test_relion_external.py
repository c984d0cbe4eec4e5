"""Unit tests of the RELION External-job adapter: RELION's argv shapes, version detection, the output-nodes
file per version, exit/abort markers, the queue template rendered the way RELION renders it, and the
compute-node wrapper. (The adapter inside a real RELION pipeline: test_relion_external_pipeline.py.)"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import starfile

from cryofastar_core.runtime.errors import InputError
from relion_external.main import ProgressReporter, relion_version, run_external_job
from relion_external.markers import ABORT_NOW, ABORTED, FAILURE, SUCCESS, JobAborted, JobMarkers
from relion_external.nodes import (NODES_FILE, OutputNode, detect_relion_version, job_output_nodes,
                                   render_output_nodes, write_output_nodes)
from relion_external.protocol import gpu_device, job_settings, parse_external_args, unused_flags

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "deploy" / "relion" / "cryofastar-relion-wrapper.sh"
TEMPLATE = REPO / "deploy" / "relion" / "slurm_external_template.sh"


# --- argv --------------------------------------------------------------------------------------------------------

def test_parses_the_argv_relion_sends():
    # Logged from RELION 3.1.3: inputs, user parameters, --j, then "Additional arguments".
    argv = ["--o", "External/job001/", "--in_parts", "Import/proj.star", "--in_3dref", "ref.mrc", "--weights",
            "/w/tiny.pt", "--views", "64", "--j", "2", "--extra_flag", "1"]
    args = parse_external_args(argv)
    assert args.out_dir == "External/job001/"
    assert args.in_parts == "Import/proj.star" and args.inputs["in_3dref"] == "ref.mrc"
    assert args.threads == 2
    assert job_settings(args) == {"weights": "/w/tiny.pt", "views": 64, "threads": 2}
    assert unused_flags(args) == ["--extra_flag"]


def test_empty_values_unknown_flags_and_pipeline_control():
    # An empty GUI value gives a bare flag; RELION may inject --pipeline_control (5.0: --pipeline-control).
    argv = ["--o", "External/job007/", "--in_parts", "p.star", "--gpu", "--keep_fraction", "--box", "--seed", "-1",
            "--min-confidence", "2.5", "--j", "4", "--pipeline_control", "External/job007/", "--bare",
            "--pipeline-control", "External/job007/", "--refine_iters=2", "stray"]
    args = parse_external_args(argv)
    assert args.params["gpu"] is None and args.params["keep_fraction"] is None and args.params["box"] is None
    settings = job_settings(args)
    assert settings == {"device": "auto", "threads": 4, "seed": -1, "min_confidence": 2.5, "refine_iters": 2}
    assert "pipeline_control" not in args.params
    assert unused_flags(args) == ["--bare", "stray"]


def test_empty_value_as_the_last_token_and_no_inputs():
    args = parse_external_args(["--o", "External/job002/", "--j", "1", "--weights"])
    assert args.params == {"weights": None} and args.in_parts is None
    assert job_settings(args) == {"threads": 1}


def test_missing_o_and_bad_values_are_input_errors_naming_the_parameter():
    with pytest.raises(InputError, match="--o"):
        parse_external_args(["--in_parts", "p.star", "--j", "1"])
    with pytest.raises(InputError, match="'views'.*whole number"):
        job_settings(parse_external_args(["--o", "E/", "--views", "lots"]))
    with pytest.raises(InputError, match="'keep_fraction'"):
        job_settings(parse_external_args(["--o", "E/", "--keep_fraction", "most"]))
    with pytest.raises(InputError, match="'gpu'"):
        gpu_device("first")


@pytest.mark.parametrize("value,device", [(None, "auto"), ("", "auto"), ("0", "cuda:0"), ("1", "cuda:1"),
                                          ("2,3", "cuda:2"), ("1:0", "cuda:1"), ("cpu", "cpu")])
def test_gpu_parameter(value, device):
    assert gpu_device(value) == device


def test_explicit_device_parameter_wins_over_gpu():
    args = parse_external_args(["--o", "E/", "--gpu", "0", "--device", "cpu"])
    assert job_settings(args)["device"] == "cpu"


# --- version detection and the nodes file ---------------------------------------------------------------------------

PIPELINE_31 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3

# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessType #3
_rlnPipeLineProcessStatus #4
Import/job001/       None            0            2
External/job002/       None           99            0

# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeType #2
Import/job001/particles.star            3
"""

# The form RELION 4.0 writes (no 4.0 binary here to produce it): label columns, STAR version still 30001.
PIPELINE_40 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3

# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Import/job001/       None relion.importparticles  Succeeded
External/job002/       None relion.external    Running

# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
Import/job001/particles.star ParticlesData.star.relion
"""

PIPELINE_50 = PIPELINE_40.replace("# version 30001", "# version 50001").replace(
    "ParticlesData", "ParticleGroupMetadata").replace("_rlnPipeLineNodeTypeLabel #2",
                                                      "_rlnPipeLineNodeTypeLabel #2\n_rlnPipeLineNodeTypeLabelDepth #3")

MINIMAL = "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n\n"


@pytest.mark.parametrize("text,version", [(PIPELINE_31, 3), (PIPELINE_40, 4), (PIPELINE_50, 5)])
def test_detects_the_relion_version_from_default_pipeline(tmp_path, text, version):
    (tmp_path / "default_pipeline.star").write_text(text)
    assert detect_relion_version(tmp_path) == version


@pytest.mark.parametrize("job_star,version", [("data_job\n\n_rlnJobType 99\n_rlnJobIsContinue 0\n", 3),
                                              ("# version 30001\n\ndata_job\n\n_rlnJobTypeLabel relion.external\n", 4),
                                              ("# version 50001\n\ndata_job\n\n_rlnJobTypeLabel relion.external\n", 5)])
def test_a_brand_new_pipeline_falls_back_to_job_star(tmp_path, job_star, version):
    (tmp_path / "default_pipeline.star").write_text(MINIMAL)
    job = tmp_path / "External" / "job001"
    job.mkdir(parents=True)
    (job / "job.star").write_text(job_star)
    assert detect_relion_version(tmp_path, job) == version
    assert detect_relion_version(tmp_path) == 3  # no evidence: 3.x, whose int column every version tolerates


def test_detects_3_in_a_project_made_by_relion_31(tmp_path, relion):
    exe = shutil.which("relion_pipeliner")
    assert exe, "RELION 3.1 (relion_pipeliner) is required"
    (tmp_path / "default_pipeline.star").write_text(MINIMAL)
    subprocess.run([exe, "--addJob", "External", "--addJobOptions", "fn_exe == /bin/true;nr_threads == 1"],
                   cwd=tmp_path, check=True, capture_output=True)
    assert detect_relion_version(tmp_path, tmp_path / "External" / "job001") == 3


def test_relion_version_parameter_overrides_detection(tmp_path):
    (tmp_path / "default_pipeline.star").write_text(PIPELINE_31)
    assert relion_version({"relion_version": "5.0"}, tmp_path, tmp_path) == 5
    assert relion_version({"relion_version": None}, tmp_path, tmp_path) == 3
    with pytest.raises(InputError, match="relion_version"):
        relion_version({"relion_version": "2.1"}, tmp_path, tmp_path)


@pytest.mark.parametrize("version,labels", [
    (3, ["ParticlesData.star.relion", "DensityMap.mrc", "DensityMap.mrc.halfmap"]),
    (4, ["ParticlesData.star.relion", "DensityMap.mrc", "DensityMap.mrc.halfmap"]),
    (5, ["ParticleGroupMetadata.star.relion", "DensityMap.mrc", "DensityMap.mrc.halfmap"])])
def test_nodes_file_has_int_types_and_the_versions_labels(tmp_path, version, labels):
    path = write_output_nodes(tmp_path, job_output_nodes("External/job012/"), version)
    assert path.name == NODES_FILE
    table = starfile.read(path, always_dict=True)["output_nodes"]
    assert list(table.columns) == ["rlnPipeLineNodeName", "rlnPipeLineNodeType", "rlnPipeLineNodeTypeLabel"]
    assert list(table["rlnPipeLineNodeName"]) == ["External/job012/particles.star", "External/job012/map.mrc",
                                                  "External/job012/half1.mrc"]
    assert list(table["rlnPipeLineNodeType"]) == [3, 6, 10]
    assert list(table["rlnPipeLineNodeTypeLabel"]) == labels
    assert not list(tmp_path.glob(".*tmp*"))


def test_every_further_class_is_a_node(tmp_path, monkeypatch):
    """With several classes, class 1 is map.mrc and every further class's map and half map 1 are nodes."""
    job = tmp_path / "External" / "job012"
    job.mkdir(parents=True)
    for name in ("map.mrc", "half1.mrc", "class002_map.mrc", "class002_half1.mrc", "class003_map.mrc",
                 "class003_half1.mrc"):
        (job / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # RELION runs the job from the project folder
    nodes = job_output_nodes("External/job012/")
    assert [(n.name, n.kind) for n in nodes[3:]] == [
        ("External/job012/class002_map.mrc", "map"), ("External/job012/class002_half1.mrc", "halfmap"),
        ("External/job012/class003_map.mrc", "map"), ("External/job012/class003_half1.mrc", "halfmap")]


def test_node_names_with_spaces_are_refused():
    with pytest.raises(ValueError, match="white space"):
        render_output_nodes([OutputNode("External/job 1/map.mrc", "map")], 3)


# --- markers and the program around the engine ----------------------------------------------------------------------

def test_exactly_one_exit_marker_and_abort_cleanup(tmp_path):
    m = JobMarkers(tmp_path)
    (tmp_path / SUCCESS).touch()  # stale, from an earlier run outside RELION
    (tmp_path / ABORT_NOW).touch()
    assert m.abort_requested()
    with pytest.raises(JobAborted):
        m.check_abort()
    m.finish("aborted")
    assert sorted(p.name for p in tmp_path.iterdir()) == [ABORTED]
    m.finish("failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAILURE]


def test_progress_reporter_prints_and_polls_for_abort(tmp_path):
    stream = io.StringIO()
    report = ProgressReporter(JobMarkers(tmp_path), interval=3600, stream=stream)
    report("poses", 16, 100)
    report("poses", 32, 100)  # throttled
    report("poses", 100, 100)  # a stage's end is always shown
    assert stream.getvalue().splitlines() == ["cryofastar-relion: poses: 16/100 particles (16 %)",
                                              "cryofastar-relion: poses: 100/100 particles (100 %)"]
    (tmp_path / ABORT_NOW).touch()
    with pytest.raises(JobAborted):
        report("reconstruct", 1, 100)


def test_bad_command_line_ends_with_a_failure_marker(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_external_job(["--o", "External/job003/", "--weights", "x.pt", "--j", "1"])  # no --in_parts
    assert code != 0
    assert sorted(p.name for p in (tmp_path / "External/job003").iterdir()) == [FAILURE]
    err = capsys.readouterr().err
    assert "--in_parts" in err and "Fix:" in err and "Traceback" not in err
    # Without --o there is no folder to mark: a message and a non-zero exit, nothing written.
    assert run_external_job(["--in_parts", "p.star"]) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["External"]


def test_abort_requested_before_start_is_honoured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "External" / "job004"
    job.mkdir(parents=True)
    (tmp_path / "p.star").write_text("data_\n")
    (job / ABORT_NOW).touch()
    run_external_job(["--o", "External/job004/", "--in_parts", "p.star", "--j", "1"])
    assert sorted(p.name for p in job.iterdir()) == [ABORTED]


# --- queue template and wrapper -------------------------------------------------------------------------------------

def render_like_relion(template: str, command: str, tokens: dict[str, str]) -> str:
    """How RELION fills a queue template for a command without ``relion_`` in it: the whole line holding
    XXXcommandXXX becomes the bare command; other tokens are replaced in place (RELION 3.1 itself does this
    in ``test_queue_submission_through_the_slurm_template``, tests/test_relion_external_pipeline.py)."""
    lines = []
    for line in template.splitlines():
        if "XXXcommandXXX" in line:
            lines.append(command)
            continue
        for key, value in tokens.items():
            line = line.replace(f"XXX{key}XXX", value)
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_slurm_template_renders_to_a_valid_script(tmp_path):
    command = f"{WRAPPER} --o External/job012/ --in_parts Import/job001/particles.star --weights /w.pt --gpu 0 --j 8 "
    tokens = {"mpinodes": "1", "threads": "8", "cores": "8", "dedicated": "1", "nodes": "8", "name": "External/job012/",
              "errfile": "External/job012/run.err", "outfile": "External/job012/run.out", "queue": "gpu"}
    script = render_like_relion(TEMPLATE.read_text(), command, tokens)
    assert "XXX" not in script  # any token left (extraN without RELION_QSUB_EXTRA_COUNT) would break sbatch
    assert script.count("--o External/job012/") == 1  # the command runs once (a token in a comment would rerun it)
    assert command in script.splitlines()  # the bare command, alone on its line
    assert "#SBATCH --output=External/job012/run.out" in script and "#SBATCH --error=External/job012/run.err" in script
    assert "#SBATCH --cpus-per-task=8" in script
    sbatch_lines = [i for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert max(sbatch_lines) < first_command  # sbatch stops reading options at the first command
    path = tmp_path / "run_submit.script"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_wrapper_is_valid_bash_and_executable():
    assert subprocess.run(["bash", "-n", str(WRAPPER)]).returncode == 0
    assert os.access(WRAPPER, os.X_OK), f"{WRAPPER} must be executable (git: mode 100755)"


def _wrapper(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CRYOFASTAR_")}
    full.update(env)
    return subprocess.run([str(WRAPPER), *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)


def test_wrapper_sets_up_then_passes_relions_arguments_unchanged(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export CRYOFASTAR_TEST_ACTIVATED=venv\n")
    setup = tmp_path / "site.sh"
    setup.write_text("export CRYOFASTAR_TEST_SETUP=site\n")
    shim = tmp_path / "fake-cryofastar-relion"
    shim.write_text('#!/bin/bash\necho "$CRYOFASTAR_TEST_SETUP $CRYOFASTAR_TEST_ACTIVATED"\nprintf "[%s]" "$@"\n')
    shim.chmod(0o755)
    proc = _wrapper(tmp_path, ["--o", "External/job001/", "--gpu", "--j", "2"], CRYOFASTAR_SETUP=str(setup),
                    CRYOFASTAR_VENV=str(venv), CRYOFASTAR_RELION_EXE=str(shim))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["site venv", "[--o][External/job001/][--gpu][--j][2]"]


@pytest.mark.parametrize("env", [{"CRYOFASTAR_VENV": "/nonexistent/venv"},
                                 {"CRYOFASTAR_RELION_EXE": "/nonexistent/cryofastar-relion"}])
def test_wrapper_failing_setup_marks_the_job_failed(tmp_path, env):
    proc = _wrapper(tmp_path, ["--o", "External/job009/", "--j", "1"], **env)
    assert proc.returncode != 0
    assert "cryofastar-relion-wrapper: error:" in proc.stderr
    assert (tmp_path / "External/job009" / FAILURE).exists()


def test_help_prints_usage_exits_zero_and_writes_nothing(tmp_path, capsys):
    from relion_external.main import main

    job = tmp_path / "External" / "job001"
    assert main(["--help", "--o", str(job)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cryofastar-relion --o") and "refine_iters" in out and "--in_parts" in out
    assert not job.exists() and list(tmp_path.iterdir()) == []


def test_each_edge_names_an_option_in_its_users_words(tmp_path, monkeypatch, capsys):
    """The engine validates in JobConfig's field names; the command line says --flags, RELION its GUI
    labels (the device as 'gpu', which is what a RELION user sets)."""
    from cryofastar_core.cli.main import main
    from cryofastar_core.runtime.errors import InputError
    from cryofastar_core.job import JobConfig

    with pytest.raises(InputError) as e:
        JobConfig(particles=tmp_path / "p.star", out_dir=tmp_path / "o", views=2).validate()
    assert e.value.field == "views"
    assert main(["run", "--particles", str(tmp_path / "p.star"), "--o", str(tmp_path / "o"), "--keep-fraction",
                 "2"]) == 2
    assert "field '--keep-fraction'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.star").write_text("data_\n")
    args = ["--o", "External/job004/", "--in_parts", "p.star", "--j", "1"]
    assert run_external_job([*args, "--keep_fraction", "2"]) != 0
    assert "field 'keep_fraction'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_external_job([*args, "--gpu", "0"]) != 0
        err = capsys.readouterr().err
        assert "field 'gpu'" in err and "--device" not in err, err
