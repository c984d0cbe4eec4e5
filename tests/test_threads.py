"""Thread count from the CPUs a process may use, and the passive OpenMP wait the entry points ask for
(cryofastar_core/runtime/threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cryofastar_core.runtime.threads import cgroup_cpu_limit, set_thread_count, usable_cpus


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(1.5)
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v2_without_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(0.5)
    assert usable_cpus(tmp_path) == 1


def test_unreadable_cgroup_means_no_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("garbage")
    assert cgroup_cpu_limit(tmp_path) is None


def test_affinity_bounds_the_default():
    """A process held to one CPU (taskset, a Slurm step) defaults to one thread, not the machine's cores."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "os.environ.pop('OMP_NUM_THREADS', None); "
            "from cryofastar_core.runtime.threads import set_thread_count; print(set_thread_count(None))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_explicit_threads_win():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_thread_count(1) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("package", ["cryofastar_core.cli", "relion_external", "plugin"])
def test_entry_points_ask_for_passive_wait(package):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"import os, sys, {package}; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice stands
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
