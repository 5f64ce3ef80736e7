"""`moeyard train` and `moeyard sft`: check everything that needs no worker, then start this node's workers."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

import torch

from moeyard import configs
from moeyard.errors import LaunchError
from moeyard.launch.env import in_slurm_step, single_process
from moeyard.launch.malloc_policy import available_bytes
from moeyard.launch.torchrun import Nodes, launch_workers
from moeyard.launch.worker import RunSource, add_overrides, run_worker
from moeyard.trainer.config.resolve import machines_of, resolve_run, write_resolved
from moeyard.trainer.config.sections import Config, read_config
from moeyard.trainer.preflight import check_inputs
from moeyard.trainer.run_dir import holds_a_run
from moeyard.trainer.run_lock import HELD_ENV, RunLock
from moeyard.trainer.scheduler.memory_fit import MemoryBudget
from moeyard.trainer.scheduler.memory_model import GPU_RUNTIME_GB


def _node_rank(given: Optional[int], nnodes: int) -> int:
    """--node-rank, or under srun (one task per node) Slurm's node index."""
    if given is not None:
        return given
    if nnodes > 1 and in_slurm_step(os.environ) and "SLURM_NODEID" in os.environ:
        return int(os.environ["SLURM_NODEID"])
    return 0


def _check_gpus(backend: str, nproc: int) -> None:
    """One worker per GPU: say so here rather than from inside a worker after the others started."""
    if backend == "gloo" or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise LaunchError(f"--nproc={nproc} workers on a node with {gpus} GPU(s): start at most {gpus}, or "
                          f"train on CPUs with --set parallel.backend=gloo")


CPU_RUNTIME_GB = 0.5
"""What a CPU worker holds before any model exists (torch, moeyard, gloo: 0.32 GB measured by
benchmarks/memory.py), plus slack."""


def _gpu_memory_gb() -> float:
    """GPU 0's memory from nvidia-smi (the launcher must not create a CUDA context: it would hold GPU
    memory for the whole run); 0 when it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0]) * 2**20 / 1e9  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0.0


def _memory_per_rank(cfg: Config, nproc: int) -> Optional[MemoryBudget]:
    """What each of this node's `nproc` workers may hold (None: this machine cannot tell)."""
    if cfg.parallel.backend != "gloo" and torch.cuda.is_available():
        gpu = _gpu_memory_gb()
        return MemoryBudget(gpu, GPU_RUNTIME_GB, "one GPU", torch.device("cuda")) if gpu else None
    available = available_bytes()
    if available is None:
        return None
    return MemoryBudget(available / nproc / 1e9, CPU_RUNTIME_GB,
                        f"this host's available memory over {nproc} local workers", torch.device("cpu"))


def _say(line: str) -> None:
    """Resolution's notes go to stderr, the memory line to stdout."""
    print(line, file=sys.stderr if line.startswith("note: ") else sys.stdout, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    sft = args.command == "sft"
    config = args.config or str(configs.path("sft-tiny.yaml" if sft else "tiny.yaml"))
    if args.resume is not None:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    if args.init is not None:
        args.overrides.append(f"checkpoint.init={args.init}")
    said = read_config(config, args.overrides)  # what the file says: the run's name, ep for the default --nproc
    if sft and said.sft.data is None:
        raise LaunchError(f"{config} has no sft.data: moeyard sft needs a JSONL file of conversations there "
                          f"(or --set sft.data=FILE)")
    nodes = Nodes(args.nnodes, _node_rank(args.node_rank, args.nnodes), args.rdzv_endpoint,
                  args.rdzv_id or f"moeyard-{said.run.name}", args.local_addr)
    nodes.check()
    if args.nproc is None and said.parallel.ep % nodes.count:
        raise LaunchError(f"--nnodes={nodes.count} does not divide parallel.ep={said.parallel.ep}: give --nproc, "
                          f"the workers per node")
    nproc = args.nproc if args.nproc is not None else said.parallel.ep // nodes.count
    if nproc < 1:
        raise LaunchError(f"--nproc={nproc} must be >= 1")
    _check_gpus(said.parallel.backend, nproc)
    cfg = resolve_run(config, args.overrides, machines_of(nproc * nodes.count, nproc),
                      memory=lambda run: _memory_per_rank(run, nproc), say=_say)
    return _check_and_launch(cfg, config, args, nodes, nproc)


def _check_and_launch(cfg: Config, config: str, args: argparse.Namespace, nodes: Nodes, nproc: int) -> int:
    """The checks that read the run dir, the data and the checkpoints (reading only: a refused launch
    leaves no trace), then node 0 takes the run dir's lock for the whole job, each node writes the resolved
    config to run.dir/launch/ and its workers start from it."""
    world = nproc * nodes.count
    if cfg.checkpoint.resume == "none" and holds_a_run(cfg.run_dir) and nodes.rank == 0:
        raise LaunchError(f"run.dir {cfg.run_dir} already holds a run and --resume none was asked: resume it "
                          f"(--resume auto), choose another run.dir, or delete it")
    check_inputs(cfg)
    lock = RunLock(cfg.run_dir) if nodes.rank == 0 else None
    if lock is not None:
        lock.acquire()
    else:  # every node's workers must agree that no worker takes it (taking it is collective)
        os.environ[HELD_ENV] = "node 0's launcher"
    try:
        where = f"node {nodes.rank} of {nodes.count}, " if nodes.count > 1 else ""
        stages = f", pp={cfg.parallel.pp} ({cfg.schedule.pipeline})" if cfg.parallel.pp > 1 else ""
        print(f"training {config} on {where}{nproc} process(es) (world {world}), ep={cfg.parallel.ep}{stages}; "
              f"run dir {cfg.run_dir}", flush=True)
        if world == 1:
            return run_worker(RunSource(resolved=cfg), single_process())
        resolved = write_resolved(cfg, cfg.run_dir / "launch" / f"node{nodes.rank}.yaml")
        return launch_workers(nproc, [str(resolved), "--resolved"], nodes=nodes, max_restarts=args.max_restarts,
                              rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s, run_dir=cfg.run_dir,
                              stop_grace_s=cfg.checkpoint.stop_grace_s)
    finally:
        if lock is not None:
            lock.release()


def _add_train_args(train: argparse.ArgumentParser, default_config: str) -> None:
    train.add_argument("config", nargs="?", help=f"YAML config (default: the shipped configs/{default_config})")
    train.add_argument("--nproc", type=int, default=None,
                       help="local worker processes (default: parallel.ep of the config)")
    add_overrides(train)
    train.add_argument("--resume", default=None, metavar="auto|none|PATH",
                       help="auto (default): continue from the newest intact checkpoint of run.dir; none: start "
                            "fresh; PATH: start from that checkpoint")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="restart all workers up to N times after a failure; each restart resumes from the "
                            "newest checkpoint (torchrun's --max-restarts)")
    train.add_argument("--nnodes", type=int, default=1, help="nodes in the job, each running this command")
    train.add_argument("--node-rank", type=int, default=None,
                       help="this node's index, 0..nnodes-1 (default: SLURM_NODEID under srun, else 0); node 0 "
                            "hosts the rendezvous")
    train.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="node 0's address for the c10d rendezvous, the same on every node")
    train.add_argument("--local-addr", default=None, metavar="ADDR",
                       help="the address this node advertises to the others (default: what its hostname "
                            "resolves to; needed where that is a loopback address)")
    train.add_argument("--rdzv-id", default=None,
                       help="a job id, the same on every node (default: moeyard-<run.name>)")
    train.add_argument("--init", default=None, metavar="CKPT",
                       help="start a fresh run from these weights (moeyard convert output, a checkpoint, or a "
                            "run's checkpoints folder); the model config comes from it")
    train.set_defaults(func=cmd_train)


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (default: configs/tiny.yaml on 2 local processes)")
    _add_train_args(train, "tiny.yaml")
    sft = sub.add_parser("sft", help="instruction-tune a model from --init CKPT on the sft.data conversations "
                                     "(default: configs/sft-tiny.yaml)")
    _add_train_args(sft, "sft-tiny.yaml")
