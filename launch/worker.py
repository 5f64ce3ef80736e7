"""One training worker: read the launcher's env, join the process group, train.

Entry point of `python -m moeyard.train CONFIG [--set k=v ...]`, whatever
started the process (torchrun, `moeyard train`, or nothing: one process).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moeyard.errors import DataError, LaunchError, run_reporting
from moeyard.launch.env import DistEnv, available_cpus, resolve_env
from moeyard.launch.malloc_policy import keep_freed_memory
from moeyard.launch.peers import Peers
from moeyard.trainer.config.resolve import read_resolved, resolve_run
from moeyard.trainer.config.sections import Config, read_config
from moeyard.trainer.data.tokens import corpus_dir, ensure_corpus, read_meta
from moeyard.trainer.run_dir import Preemption
from moeyard.trainer.run_lock import lock_for_workers


def pick_device(env: DistEnv, backend: str) -> tuple[torch.device, str]:
    use_cuda = backend == "nccl" or (backend == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise LaunchError("parallel.backend=nccl needs a GPU and none is visible: use parallel.backend=gloo")
        # One GPU visible to each task (srun --gpus-per-task, or a CUDA_VISIBLE_DEVICES per worker): use it.
        index = env.local_rank if gpus >= env.local_world_size else 0 if gpus == 1 else None
        if index is None:
            raise LaunchError(f"{env.local_world_size} workers on this node but this process sees {gpus} GPUs: "
                              f"start at most {gpus} workers per node, or give each worker one GPU")
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


def _join_store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """Rank 0 hosts the rendezvous store at MASTER_ADDR:MASTER_PORT, the others dial it; a busy port or an
    unreachable master becomes a message that names the address and the fix, not a stack trace or a hang."""
    where = f"{env.master_addr}:{env.master_port}"
    try:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                             timeout=timeout)
    except dist.DistError as err:
        if env.rank == 0 and "EADDRINUSE" in str(err):
            raise LaunchError(f"rank 0 cannot listen on {where}: the port is in use. Export MASTER_PORT=<a free "
                              f"port> to every task (and MASTER_ADDR if needed)") from None
        if env.rank == 0:
            raise LaunchError(f"rank 0 waited {timeout.total_seconds():.0f} s at {where} for the other "
                              f"{env.world_size - 1} ranks and not all came ({env.launcher} launch): check that "
                              f"every task started and can reach {env.master_addr}; parallel.rendezvous_timeout_s "
                              f"sets the wait") from None
        raise LaunchError(f"rank {env.rank} could not reach the master at {where} within "
                          f"{timeout.total_seconds():.0f} s ({env.launcher} launch): check that rank 0 started, "
                          f"that {env.master_addr} resolves and is reachable from this node, or set "
                          f"MASTER_ADDR/MASTER_PORT; parallel.rendezvous_timeout_s sets the wait") from None


def init_distributed(env: DistEnv, backend: str, timeout_s: float, rendezvous_timeout_s: float) -> None:
    timeout = timedelta(seconds=timeout_s)
    if env.world_size == 1 and env.launcher == "single":
        # A group of one needs no rendezvous: an in-memory store, no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif env.launcher != "torchrun":  # Slurm or MPI: no agent hosts a store, rank 0 does
        store = _join_store(env, timedelta(seconds=rendezvous_timeout_s))
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # After a torchrun restart the store still holds the previous round's addresses; keys under a
        # per-round prefix keep the new workers from dialling dead ones.
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                              timeout=timeout)
        round_store = dist.PrefixStore(f"moeyard/round{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend, store=round_store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)


def set_cpu_threads(env: DistEnv) -> None:
    """Share the cores among local workers unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cpus() // env.local_world_size))


def _prepare_corpus_once_per_machine(cfg: Config, env: DistEnv, device: torch.device) -> None:
    """The first local worker tokenizes into data.dir (resolved); every rank learns whether any machine failed."""
    error: Optional[Exception] = None
    if env.local_rank == 0:
        try:
            ensure_corpus(cfg.data.source, cfg.data.dir, cfg.data.glob)
        except Exception as err:  # any failure must reach the all-reduce, or the other ranks wait forever
            error = err
    failed = torch.tensor([int(error is not None)], device=device)
    dist.all_reduce(failed)  # doubles as the barrier the other local workers wait at
    if error is not None:
        raise error
    if failed.item():
        raise DataError("preparing the corpus failed on another machine; see its log")
    # Every worker checks what was written (not the source again: fingerprinting it is the first worker's job)
    read_meta(corpus_dir(cfg.data.source, cfg.data.dir, cfg.data.glob))


@dataclass(frozen=True)
class RunSource:
    """Where a worker's config comes from: resolved by moeyard's launcher (`resolved`), or a file and overrides
    that the worker resolves once, after it has learnt the machines (srun, mpirun, a bare torchrun)."""

    resolved: Optional[Config] = None
    path: Optional[str | Path] = None
    overrides: tuple[str, ...] = ()

    def joining(self) -> Config:
        """What joining the process group needs (backend, timeouts): the file as it says, nothing resolved."""
        return self.resolved or read_config(self.path, self.overrides)

    def resolve(self, machines: Sequence[str]) -> Config:
        return self.resolved or resolve_run(self.path, self.overrides, machines)


def run_worker(source: RunSource, env: DistEnv, plan_only: bool = False) -> int:
    """Returns the process exit code: 0, or 128 + signal after a preemption checkpoint (alone, or under
    srun or mpirun, where that code tells the job script to requeue).

    Under torchrun a preempted worker exits 0 -- a non-zero code would make torchrun restart the job that
    is being stopped -- and leaves run.dir/PREEMPTED, which `moeyard train` turns into 128 + signal.
    """
    # Imported here, not with the module: the launcher imports this module for RunSource and add_overrides
    # and must not pay for the training loop (FSDP, DTensor, DCP, torch's pipelining).
    from moeyard.trainer.loop import run_training
    from moeyard.trainer.scheduler.report import measured_report

    preemption = Preemption()  # first: a signal during start-up is remembered, not fatal
    cfg = source.joining()
    device, backend = pick_device(env, cfg.parallel.backend)
    if device.type == "cpu":
        set_cpu_threads(env)
        keep_freed_memory(bounded=cfg.parallel.fsdp)
    if env.launcher != "single":  # an orphaned worker saves and stops instead of training on alone
        preemption.watch_parent(cfg.checkpoint.stop_grace_s)
    init_distributed(env, backend, cfg.parallel.timeout_s, cfg.parallel.rendezvous_timeout_s)
    peers: Optional[Peers] = None
    lock = None
    try:
        peers = Peers.gather()
        cfg = source.resolve(peers.nodes)
        if plan_only:
            report = measured_report(cfg, device)
            if env.rank == 0:
                print(report, flush=True)
            return 0
        if cfg.sft.data is None and not cfg.data.sources:  # SFT rows: in memory; blends: prepared already
            _prepare_corpus_once_per_machine(cfg, env, device)
        lock = lock_for_workers(cfg.run_dir)
        outcome = run_training(cfg, device, preemption)
    except RuntimeError as err:
        lost = peers.lost_peer(err, cfg.parallel.timeout_s) if peers is not None else None
        if lost is None:
            raise
        raise lost from err
    finally:
        if lock is not None:
            lock.release()
        dist.destroy_process_group()
        preemption.restore()
    if outcome.signal and env.launcher != "torchrun":
        return 128 + outcome.signal  # the conventional "stopped by signal" code, for the shell, srun or mpirun
    return 0


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeyard.train", description=__doc__)
    parser.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    add_overrides(parser)
    parser.add_argument("--resolved", action="store_true",
                        help="CONFIG is the run config `moeyard train` resolved into run.dir: read it as it is")
    parser.add_argument("--plan-only", action="store_true",
                        help="profile this machine on the real process groups, print the plan, and exit")
    args = parser.parse_args(argv)
    if args.resolved and (args.config is None or args.overrides):
        parser.error("--resolved reads one resolved config file, without --set")
    from moeyard import configs

    def run() -> int:
        source = RunSource(resolved=read_resolved(args.config)) if args.resolved else \
            RunSource(path=args.config or configs.path("tiny.yaml"), overrides=tuple(args.overrides))
        return run_worker(source, resolve_env(), plan_only=args.plan_only)

    return run_reporting(run)
