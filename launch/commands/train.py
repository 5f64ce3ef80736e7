"""`moeyard train` and `moeyard sft`: check everything that needs no worker, then start this node's workers."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

import torch

from moeyard import configs
from moeyard.errors import ConfigError, LaunchError
from moeyard.launch.env import in_slurm_step, single_process
from moeyard.launch.host_memory import available_bytes
from moeyard.launch.torchrun import Nodes, launch_workers
from moeyard.launch.worker import add_overrides, run_worker, worker_args
from moeyard.parallel.scheduler.memory_model import GPU_RUNTIME_GB
from moeyard.trainer.config import Config, validate_for_world
from moeyard.trainer.memory_plan import fit_memory
from moeyard.trainer.node_layout import node_layout_notes, with_node_layout
from moeyard.trainer.preflight import check_inputs
from moeyard.trainer.run_config import resolve_config
from moeyard.trainer.run_dir import holds_a_run
from moeyard.trainer.run_lock import HELD_ENV, RunLock
from moeyard.trainer.schedule import act_bytes


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


def _memory_per_rank(cfg: Config, nproc: int) -> tuple[float, float, str, torch.device]:
    """(GB each rank may use, GB of it the runtime takes, what that memory is, the device)."""
    if cfg.parallel.backend != "gloo" and torch.cuda.is_available():
        return _gpu_memory_gb(), GPU_RUNTIME_GB, "one GPU", torch.device("cuda")
    available = available_bytes()
    if available is None:
        return 0.0, 0.0, "unknown", torch.device("cpu")
    return (available / nproc / 1e9, CPU_RUNTIME_GB, f"this host's available memory over {nproc} local workers",
            torch.device("cpu"))


def _fit_memory(cfg: Config, world: int, nproc: int, nodes: int) -> list[str]:
    """The check before any worker starts: overrides that make the run fit (schedule.mode=auto), or none;
    raises ConfigError when it does not fit. With several nodes every node decides alone, so a choice
    would differ between nodes that see different free memory: there auto says what to set instead."""
    if not cfg.schedule.memory_check:
        return []
    capacity, reserve, what, device = _memory_per_rank(cfg, nproc)
    if not capacity:
        return []
    overrides, message = fit_memory(cfg, world, act_bytes(cfg, device), capacity, what, reserve)
    if overrides and nodes > 1:
        raise ConfigError(f"{message}; with {nodes} nodes set these on every node's command line "
                          f"(--set {' --set '.join(overrides)}) so that all nodes run the same layout")
    print(message, flush=True)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    sft = args.command == "sft"
    config = args.config or str(configs.path("sft-tiny.yaml" if sft else "tiny.yaml"))
    if args.resume is not None:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    if args.init is not None:
        args.overrides.append(f"checkpoint.init={args.init}")
    cfg = resolve_config(config, args.overrides)
    if sft and cfg.sft.data is None:
        raise LaunchError(f"{config} has no sft.data: moeyard sft needs a JSONL file of conversations there "
                          f"(or --set sft.data=FILE)")
    nodes = Nodes(args.nnodes, _node_rank(args.node_rank, args.nnodes), args.rdzv_endpoint,
                  args.rdzv_id or f"moeyard-{cfg.run.name}", args.local_addr)
    nodes.check()
    if args.nproc is None and cfg.parallel.ep % nodes.count:
        raise LaunchError(f"--nnodes={nodes.count} does not divide parallel.ep={cfg.parallel.ep}: give --nproc, "
                          f"the workers per node")
    nproc = args.nproc if args.nproc is not None else cfg.parallel.ep // nodes.count
    if nproc < 1:
        raise LaunchError(f"--nproc={nproc} must be >= 1")
    world = nproc * nodes.count
    validate_for_world(cfg, world)
    with_node_layout(cfg, world, cfg.parallel.ranks_per_node or nproc)  # checks what resolving the layout implies
    for note in node_layout_notes(cfg, cfg.parallel.ranks_per_node or nproc):
        print(f"note: {note}", file=sys.stderr, flush=True)
    _check_gpus(cfg.parallel.backend, nproc)
    chosen = _fit_memory(cfg, world, nproc, nodes.count)
    if chosen:  # every worker gets the same choice through its command line
        args.overrides += chosen
        cfg = resolve_config(config, args.overrides)
    return _check_and_launch(cfg, config, args, nodes, nproc)


def _check_and_launch(cfg: Config, config: str, args: argparse.Namespace, nodes: Nodes, nproc: int) -> int:
    """The checks that read the run dir, the data and the checkpoints (reading only: a refused launch
    leaves no trace), then node 0 takes the run dir's lock for the whole job and the workers start."""
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
        print(f"training {config} on {where}{nproc} process(es) (world {world}), ep={cfg.parallel.ep}; "
              f"run dir {cfg.run_dir}", flush=True)
        if world == 1:
            return run_worker(cfg, single_process())
        return launch_workers(nproc, worker_args(config, args.overrides), nodes=nodes,
                              max_restarts=args.max_restarts,
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
