"""Two in-process ranks for the tests of work shared over torch.distributed (gloo, CPU), and the one-thread
process they are compared with."""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread(work: Callable[..., Any], *args) -> Any:
    """``work(*args)`` with torch on one thread, as each rank of :func:`on_two_ranks` runs: with more, one
    process sums in yet another order than the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return work(*args)
    finally:
        torch.set_num_threads(threads)


def on_two_ranks(work: Callable[..., Any], *args) -> list:
    """``[work(comm, *args) on rank 0, ... on rank 1]``: two spawned processes joined in a gloo process group,
    one thread each, ``comm`` their :class:`~cryofastar_core.runtime.communicator.Communicator`. ``work`` must
    be a module-level function (it is pickled into the ranks) returning a picklable value."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, free_port(), work, args, results), nprocs=2, join=True)
    return [results[0], results[1]]


def _rank_main(rank: int, world: int, port: int, work: Callable[..., Any], args: tuple, results) -> None:
    from cryofastar_core.runtime.communicator import Communicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = work(Communicator.from_process_group(), *args)
    finally:
        torch.distributed.destroy_process_group()
