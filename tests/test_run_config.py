"""`cryofastar run --config step.yaml`: an unattended pipeline step (settings, precedence, errors, idempotency)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cryofastar_core.cli.main import main
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.job.step_file import build_job_config, read_step_file
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

REPO = Path(__file__).resolve().parents[1]
BOX = 32


@pytest.fixture(scope="module")
def sim_star(tmp_path_factory, tiny_map_file) -> Path:
    out = tmp_path_factory.mktemp("sim")
    return simulate(SimulateConfig(out_dir=out, n=60, box=BOX, snr=1.0, seed=3, map_path=tiny_map_file, ctf=True))


def _step(folder: Path, **settings) -> Path:
    path = folder / "step.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "cryofastar_core.cli.main", "run", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def test_step_file_runs_flags_override_and_rerun_does_nothing(sim_star, tiny_weights, tmp_path):
    # Relative paths are relative to the step file, wherever the command is started.
    step_dir = tmp_path / "pipeline"
    step_dir.mkdir()
    step = _step(step_dir, particles=os.path.relpath(sim_star, step_dir), o="out", weights=str(tiny_weights),
                 project_dir=os.path.relpath(sim_star.parent, step_dir), views=20, candidates=2, anchors=4,
                 device="cpu", seed=1, keep_fraction=0.9)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _cli("--config", str(step), "--views", "16", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = step_dir / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["views"] == 16          # the flag wins over the file
    assert report["settings"]["candidates"] == 2      # the file wins over the default (64)
    assert report["settings"]["seed"] == 1 and report["n_kept"] == 54
    assert report["status"] == "complete"
    before = (out / "report.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    proc = _cli("--config", str(step), "--views", "16", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stderr
    assert (out / "report.json").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps


@pytest.mark.parametrize("settings, key, words", [
    ({"views": 16, "colour": "red"}, "colour", "unknown setting"),
    ({"views": "many"}, "views", "not a whole number"),
    ({"views": 16.5}, "views", "not a whole number"),
    ({"keep_fraction": "most"}, "keep_fraction", "not a number"),
    ({"keep_fraction": 1.5}, "keep_fraction", "not in (0, 1]"),
    ({"anchors": 200}, "anchors", "does not fit"),
    ({"device": "tpu"}, "device", "unknown device"),
    ({"particles": None}, "particles", "must not be empty"),
])
def test_bad_step_file_names_file_and_key(settings, key, words, sim_star, tmp_path):
    step = _step(tmp_path, **{"particles": str(sim_star), "o": "out", **settings})
    with pytest.raises(InputError) as err:
        build_job_config(step, {})
    assert err.value.path == step and err.value.field == key, str(err.value)
    assert words in err.value.problem
    # Through the command line: one message, exit code 2, nothing written.
    assert main(["run", "--config", str(step)]) == 2
    assert not (tmp_path / "out" / "report.json").exists()


def test_bad_yaml_and_missing_required(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("views: [16\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- views\n")
    with pytest.raises(InputError, match="mapping"):
        read_step_file(listed)
    only_views = _step(tmp_path, views=16)
    with pytest.raises(InputError) as err:
        build_job_config(only_views, {"particles": None})
    assert err.value.field == "particles"
    assert main(["run"]) == 2  # neither --particles nor --config
    assert "--particles" in capsys.readouterr().err


def test_precedence_defaults_file_flags(sim_star, tmp_path):
    step = _step(tmp_path, **{"particles": str(sim_star), "out-dir": "o1", "views": 32, "min-confidence": 0.5,
                              "weights": "my.pt"})
    cfg = build_job_config(step, {"views": 16, "seed": 7, "out_dir": None})
    assert cfg.views == 16 and cfg.seed == 7        # flags
    assert cfg.min_confidence == 0.5                # file (dashes accepted)
    assert cfg.out_dir == tmp_path / "o1"           # relative to the file
    assert cfg.weights == str(tmp_path / "my.pt")   # a weights file, relative to the file
    assert cfg.candidates == 64 and cfg.device == "auto"  # defaults
    # A bad value given as a flag is reported against the option (in the engine's name, which the
    # command line shows as its flag), not the file.
    from cryofastar_core.cli.job_flags import CLI_NAMES

    with pytest.raises(InputError) as err:
        build_job_config(step, {"views": 2})
    assert err.value.path is None and err.value.field == "views"
    assert err.value.renamed(CLI_NAMES).field == "--views"
    # The shipped-name form of weights stays a name.
    assert build_job_config(_step(tmp_path, particles=str(sim_star), o="x", weights="default"), {}).weights == "default"


def test_example_step_file_is_valid():
    example = REPO / "deploy" / "pipeline" / "step.yaml"
    settings = read_step_file(example)
    assert {"particles", "out_dir", "weights", "views"} <= set(settings)
