"""Running one job over several processes (``torchrun``): who does what, and failing together.

A :class:`Communicator` wraps ``torch.distributed`` for the main job. Every collective it offers first
runs the caller's local work and then tells every rank whether any rank failed, so an error on one rank
(bad input, a full disk, a bug) is raised on all of them instead of leaving the others waiting in a
collective forever. The failing rank re-raises its own exception (its exit code stands); the others
raise :class:`PeerFailure` with that rank's message and exit code.

The single-process case is the same object with ``world_size == 1``, where every collective is a plain
local call, so the job's code is one path.

Reading torchrun's environment, picking the rank's device and joining the process group (gloo on CPU,
NCCL on GPU with one GPU per ``LOCAL_RANK``, one timeout) live in :mod:`cryofastar_core.runtime.distributed`,
shared with training; their names are re-exported here for the job's callers.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch

from cryofastar_core.runtime.distributed import (DEFAULT_TIMEOUT_S, DistEnv, dist_env, init_process_group, rank_device,
                                         shutdown)
from cryofastar_core.runtime.errors import CryoFastARError
from cryofastar_core.runtime.exit_codes import exit_code

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["DEFAULT_TIMEOUT_S", "Communicator", "DistEnv", "PeerFailure", "dist_env", "init_from_env",
           "rank_device", "shutdown"]


class PeerFailure(CryoFastARError):
    """Another rank of a distributed run failed; carries that rank's message and exit code."""

    def __init__(self, rank: int, message: str, exit_code: int):
        self.rank, self.exit_code = rank, exit_code
        super().__init__(f"process rank {rank} of this distributed run failed: {message}")


def init_from_env(device: str = "auto") -> tuple["Communicator", str]:
    """Join the process group described by the environment (no-op for one process).

    Returns the communicator and this rank's device string (see :func:`rank_device`).
    """
    env = dist_env()
    dev = rank_device(device, env)
    if not env.distributed:
        return Communicator(), dev
    init_process_group(dev, env)
    return Communicator.from_process_group(), dev


def _describe(exc: BaseException) -> tuple[str, int]:
    code = exit_code(exc)  # the code this rank's own process exits with
    text = str(exc) if isinstance(exc, CryoFastARError) else f"{type(exc).__name__}: {exc}"
    return text, int(code)


class Communicator:
    """Failure-aware collectives over the default process group (or one process when not initialised)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_process_group(cls) -> "Communicator":
        """The default process group when one is initialised, else a single process."""
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives with failure agreement ---------------------------------------------------------------
    def gather(self, work: Callable[[], T]) -> list[T]:
        """Run ``work()`` here, then return every rank's result in rank order (on every rank).

        If ``work`` raised on any rank, every rank raises (see the module docstring). ``KeyboardInterrupt``
        and SIGTERM are not caught: the launcher stops every rank in that case.
        """
        payload: tuple[bool, Any]
        try:
            payload = (True, work())
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised here
            if not self.distributed:
                raise
            own = exc
            payload = (False, _describe(exc))
        else:
            own = None
        if not self.distributed:
            return [payload[1]]
        everything = self._all_gather_object(payload)
        self._raise_failures(everything, own)
        return [p[1] for p in everything]

    def check(self, work: Callable[[], T]) -> T:
        """Run ``work()`` here and return its result once every rank has finished its own part without error."""
        if not self.distributed:
            return work()
        result: list[T] = []

        def keep() -> None:
            result.append(work())

        self.gather(keep)
        return result[0]

    def on_main(self, work: Callable[[], T], share: bool = True) -> T | None:
        """Run ``work()`` on rank 0 only; return its result on every rank (``share``) or on rank 0 only (the
        others get None, e.g. for maps they do not need). A failure is raised on every rank."""
        if not self.distributed:
            return work()
        payload: tuple[bool, Any] | None = None
        own = None
        if self.is_main:
            try:
                result = work()
                payload = (True, result if share else None)
            except Exception as exc:  # noqa: BLE001
                own = exc
                payload = (False, _describe(exc))
        import torch.distributed as tdist

        box = [payload]
        tdist.broadcast_object_list(box, src=0, device=self._object_device())
        ok, value = box[0]
        if not ok:
            if own is not None:
                raise own
            raise PeerFailure(0, value[0], value[1])
        return result if self.is_main else value

    def reduce_sum_(self, tensors: list[torch.Tensor], dst: int | None = 0) -> None:
        """Sum ``tensors`` over ranks in place: into rank ``dst`` only (the other ranks' tensors are undefined
        afterwards: backends use them as scratch), or into every rank's when ``dst`` is None.

        Call only right after a :meth:`check` / :meth:`gather`, so that every rank is known to be here.
        Complex tensors are reduced as their real views (supported by every backend).
        """
        if not self.distributed:
            return
        import torch.distributed as tdist

        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("reduce_sum_ needs contiguous tensors")
            view = torch.view_as_real(t) if t.is_complex() else t
            if dst is None:
                tdist.all_reduce(view, op=tdist.ReduceOp.SUM)
            else:
                tdist.reduce(view, dst=dst, op=tdist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.distributed:
            self.gather(lambda: None)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _object_device(self) -> torch.device | None:
        import torch.distributed as tdist

        if tdist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def _all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def _raise_failures(self, everything: list[tuple[bool, Any]], own: BaseException | None) -> None:
        failed = [(r, p[1]) for r, p in enumerate(everything) if not p[0]]
        if not failed:
            return
        if own is not None:
            raise own
        rank, (text, code) = failed[0]
        raise PeerFailure(rank, text, code)

