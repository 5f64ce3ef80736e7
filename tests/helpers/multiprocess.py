"""Run a function on N real processes in a gloo process group, with a hard timeout.

A hung collective fails the calling test with a message; it never stalls the suite.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        try:
            # by value (plain pickle): torch's queue pickler would share a tensor's storage through a file
            # descriptor the worker serves until it exits, which it may do before the parent reads it
            results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, "error", traceback.format_exc()))


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "moeyard.parallel", "moeyard.trainer.step",
            "moeyard.trainer.loop", "torch._dynamo"]
"""Imported once, by the fork server, before it forks the workers: each worker starts with them loaded
(importing torch and moeyard costs ~2.6 s of CPU per process, most of a small test's time on 2 cores; torch
imports torch._dynamo, ~0.6 s more, at the first call of a function it keeps from compiling, such as an
optimizer's constructor)."""


def _context():
    """A fork server's: workers forked from a process that imported torch but never ran an op, so no
    thread pool is copied half-initialised (what makes a plain fork of the test process unsafe). The
    server starts at the first call and keeps that moment's environment: what a case needs, it is given
    through its arguments (as `_entry` does with the rendezvous address)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(fn: Callable, world: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Call fn(rank, world, *args) on `world` processes; return their results in rank order.

    `fn` must be importable by module name (define it in a module under tests/, not in a test file).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results, timeout_s / 2), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(collected))
                raise AssertionError(f"{fn.__name__} on {world} ranks: ranks {missing} gave no result within "
                                     f"{timeout_s:.0f} s (hung collective?)") from None
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                collected[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError(f"{fn.__name__} failed on {world} ranks:\n" + "\n".join(errors))
    return [collected[r] for r in range(world)]
