"""Where this process sits in a ``torchrun`` launch, and joining its process group: the one place for both.

Training (:mod:`cryofastar_core.training.trainer`, ``cryofastar train``) and the main job
(:mod:`cryofastar_core.runtime.communicator`, ``cryofastar run``) both come here, so they read the
launch the same way and join the same kind of group:

- ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by ``torchrun``; absent: one process) are read by
  :func:`dist_env` only;
- the rank's device is picked by :func:`rank_device`: ``auto`` is CUDA when a GPU is visible, and a CUDA
  rank takes GPU ``LOCAL_RANK`` modulo the visible GPUs;
- :func:`init_process_group` joins the group with ``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``):
  gloo on CPU, NCCL on CUDA (after selecting the rank's GPU), with the timeout of :func:`dist_timeout`.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch

from cryofastar_core.runtime.errors import InputError

# Ranks wait for each other at stage boundaries (the job) and while rank 0 validates, checkpoints or
# writes (training, the job); the process-group timeout must cover the longest such wait.
DEFAULT_TIMEOUT_S = 4 * 3600
TIMEOUT_ENV = "CRYOFASTAR_DIST_TIMEOUT_S"
_LAUNCH_FIX = "launch with torchrun, or unset these variables for one process"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits, as read from torchrun's environment (defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``LOCAL_RANK`` defaults to ``RANK``); InputError if malformed."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise InputError(None, "WORLD_SIZE/RANK/LOCAL_RANK", f"not integers ({exc})", _LAUNCH_FIX) from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(None, "WORLD_SIZE/RANK", f"rank {rank} is not in a world of {world}", _LAUNCH_FIX)
    if local < 0:
        raise InputError(None, "LOCAL_RANK", f"must be >= 0, got {local}", _LAUNCH_FIX)
    return DistEnv(rank, world, local)


def rank_device(device: str, env: DistEnv) -> str:
    """This rank's device string: ``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` on a GPU
    machine -> ``cuda:<LOCAL_RANK mod visible GPUs>``. Anything else (``cpu``, ``cuda:1``) is returned as is."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{env.local_rank % torch.cuda.device_count()}"
    return device


def dist_timeout() -> datetime.timedelta:
    """The process-group timeout: ``CRYOFASTAR_DIST_TIMEOUT_S`` seconds, default :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InputError(None, TIMEOUT_ENV, f"{raw!r} is not a positive number of seconds",
                         f"set it to e.g. {DEFAULT_TIMEOUT_S}, or unset it for the default")
    return datetime.timedelta(seconds=seconds)


def init_process_group(device: str | torch.device, env: DistEnv) -> bool:
    """Join the process group of ``env`` on ``device`` (this rank's, see :func:`rank_device`).

    Nothing to do for one process, or when a group is already initialised (e.g. by a caller); returns
    whether this call joined one (the caller then leaves it with :func:`shutdown`).
    """
    if not env.distributed:
        return False
    import torch.distributed as tdist

    if tdist.is_initialized():
        return False
    dev = torch.device(device)
    timeout = dist_timeout()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                             rank=env.rank, world_size=env.world_size, timeout=timeout)
    return True


def shutdown() -> None:
    """Leave the process group if one was joined."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
