"""The Slurm templates in deploy/slurm, rendered and run through stub `sbatch`/`srun`/`scontrol` on this machine.

The stubs execute the job script at once with the variables a real one-node allocation sets
(SLURM_JOB_ID, SLURM_NNODES, SLURM_GPUS_ON_NODE, SLURM_JOB_NODELIST, ...). torchrun runs with gloo on
the CPU (CRYOFASTAR_DEVICE=cpu, the templates' variable for that), so a broken template fails here.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryofastar_core.io import read_particles
from cryofastar_core.io.cs import write_particles_cs
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "deploy" / "slurm"
BOX = 32
JOB = ["--views", "16", "--candidates", "2", "--anchors", "4"]

STUB_SBATCH = r"""#!/bin/bash
# Test stand-in for sbatch: runs the job script now, as a one-node allocation would.
script="${@: -1}"
export SLURM_JOB_ID=4242 SLURM_JOB_NAME=cryofastar SLURM_NNODES=1 SLURM_NTASKS=1 SLURM_JOB_NUM_NODES=1
export SLURM_JOB_NODELIST=testnode01 SLURM_NODELIST=testnode01 SLURM_SUBMIT_DIR="$PWD"
export SLURM_GPUS_ON_NODE="${STUB_GPUS_ON_NODE:-1}" SLURM_CPUS_PER_TASK="${STUB_CPUS_PER_TASK:-2}"
log=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed "s/%x/$SLURM_JOB_NAME/; s/%j/$SLURM_JOB_ID/")
echo "Submitted batch job $SLURM_JOB_ID"
bash "$script" > "${log:-slurm-$SLURM_JOB_ID.out}" 2>&1
"""
STUB_SRUN = r"""#!/bin/bash
# Test stand-in for srun on a one-node allocation: one task, options dropped.
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
STUB_SCONTROL = r"""#!/bin/bash
# Test stand-in for `scontrol show hostnames LIST`: this machine.
[[ "$1 $2" == "show hostnames" ]] && echo localhost
"""


@pytest.fixture(scope="module")
def sim_star(tmp_path_factory, tiny_map_file) -> Path:
    out = tmp_path_factory.mktemp("sim")
    return simulate(SimulateConfig(out_dir=out, n=60, box=BOX, snr=1.0, seed=3, map_path=tiny_map_file, ctf=True))


@pytest.fixture()
def cluster(tmp_path) -> dict:
    """A PATH with the stub commands first, and the environment of a CPU-only test submission."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", STUB_SBATCH), ("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO),
               CRYOFASTAR_DEVICE="cpu", CRYOFASTAR_RDZV_PORT=str(port), MPLBACKEND="Agg")
    env.pop("OMP_NUM_THREADS", None)  # the templates set it from SLURM_CPUS_PER_TASK
    return env


def _render(template: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(SLURM / "render.py"), template, "--python", sys.executable, *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _submit(text: str, folder: Path, env: dict, **extra_env: str) -> str:
    script = folder / "job.sbatch"
    script.write_text(text)
    proc = subprocess.run(["sbatch", str(script)], cwd=folder, env={**env, **extra_env}, capture_output=True,
                          text=True, timeout=240)
    log = folder / "cryofastar-4242.out"
    out = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, out[-4000:] + proc.stderr
    assert "Submitted batch job 4242" in proc.stdout
    return out


def test_render_fills_every_placeholder_and_drops_empty_sbatch_lines():
    text = _render("multi_node", "--nodes", "3", "--gpus-per-node", "4", "--cpus-per-gpu", "6", "--partition", "gpu",
                   "--", "--particles", "my particles.star", "--o", "out")
    assert "{{" not in text and "}}}" not in text
    assert "#SBATCH --nodes=3" in text and "#SBATCH --gpus-per-node=4" in text
    assert "#SBATCH --cpus-per-task=24" in text and "#SBATCH --partition=gpu" in text
    assert "--account" not in text  # left empty: the line is dropped
    assert "'my particles.star'" in text  # quoted for the shell
    proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    missing = subprocess.run([sys.executable, str(SLURM / "render.py"), "single_gpu"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--config" in missing.stderr


def test_single_gpu_template(sim_star, tiny_weights, tmp_path, cluster):
    out = tmp_path / "run"
    text = _render("single_gpu", "--", "--particles", str(sim_star), "--o", str(out), "--weights", str(tiny_weights),
                   *JOB)
    log = _submit(text, tmp_path, cluster)
    assert "device cpu" in log
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["processes"] == 1
    assert report["settings"]["threads"] == 2  # from SLURM_CPUS_PER_TASK


@pytest.mark.parametrize("template", ["multi_gpu", "multi_node"])
def test_multi_process_templates(template, sim_star, tiny_weights, tmp_path, cluster):
    step = tmp_path / "step.yaml"
    step.write_text(f"particles: {sim_star}\no: run\nweights: {tiny_weights}\nviews: 16\ncandidates: 2\nanchors: 4\n")
    text = _render(template, "--gpus-per-node", "2", "--nodes", "1", "--config", str(step))
    log = _submit(text, tmp_path, cluster, STUB_GPUS_ON_NODE="2")
    assert "2 processes" in log
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["processes"] == 2 and report["n_particles"] == 60
    assert len(read_particles(tmp_path / "run" / "particles.star", sim_star.parent)) == 60


def test_failed_job_fails_the_template(tmp_path, cluster):
    text = _render("single_gpu", "--", "--particles", str(tmp_path / "missing.star"), "--o", str(tmp_path / "o"))
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    proc = subprocess.run(["sbatch", str(script)], cwd=tmp_path, env=cluster, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2  # bad input: the job's exit status, which Slurm reports as FAILED
    assert "missing.star" in (tmp_path / "cryofastar-4242.out").read_text()


def test_cryosparc_connector_template_offline(sim_star, tiny_weights, tmp_path, cluster):
    particles = read_particles(sim_star)
    cs = sim_star.parent / "particles.cs"
    write_particles_cs(particles, cs, np.tile(np.eye(3), (len(particles), 1, 1)), np.zeros((len(particles), 2)))
    out = tmp_path / "cs_out"
    text = _render("cryosparc_connector", "--", "--cs", str(cs), "--project-dir", str(sim_star.parent), "--o", str(out),
                   "--weights", str(tiny_weights), *JOB)
    _submit(text, tmp_path, cluster)
    assert (out / "particles.cs").is_file() and (out / "report.json").is_file()


def test_templates_are_executable_text():
    for path in SLURM.glob("*.sbatch"):
        text = path.read_text()
        assert text.startswith("#!/bin/bash"), path
        assert "set -euo pipefail" in text, path
    assert os.stat(SLURM / "render.py").st_mode & stat.S_IRUSR
