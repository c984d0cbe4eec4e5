"""How many CPU threads a run may use, and how its idle threads wait.

Cluster nodes are shared: a Slurm step, a container or ``taskset`` gives a process fewer CPUs than the
machine has. :func:`usable_cpus` counts what this process may really run on (its CPU affinity, and a
cgroup CPU quota where one is set), and :func:`set_thread_count` uses that when the user gives no
thread count. Torch's own default is the machine's physical cores, which oversubscribes a process
held to fewer.

Idle OpenMP threads spin by default, so a thread that shares its core with another process burns that
process's time while it waits for the others (a pass then runs many times slower, not twice).
:func:`prefer_passive_wait` asks the OpenMP runtime to sleep instead; it only takes effect before the
runtime starts (before ``torch`` is imported), so the entry points call it first. What it changes is
measured by ``bench/oversubscription.py`` (results under ``bench/results/``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or ``None`` where none is set.

    cgroup v2 (``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"``) and v1
    (``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``, quota -1 for none). ``root`` is the mounted cgroup
    folder (a test gives its own)."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None  # unreadable or unexpected: no quota known
    return None


def usable_cpus(root: Path = _CGROUP) -> int:
    """CPUs this process may use: its affinity mask, lowered to a cgroup quota (rounded up), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def set_thread_count(threads: int | None) -> int:
    """Set torch's intra-op thread count and return it: ``threads`` if given; else ``OMP_NUM_THREADS`` if
    set (torchrun sets 1 per process; torch already read it); else :func:`usable_cpus`."""
    import torch

    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = usable_cpus()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def prefer_passive_wait() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a
    policy. Call before ``torch`` is imported; afterwards it changes nothing."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
