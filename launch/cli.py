"""The `moeyard` command.

    moeyard train|sft [CONFIG] [--init CKPT] [--nproc N] [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] [--set key=value ...]
    moeyard slurm [CONFIG] --nodes N --gpus-per-node G [--nproc-per-node P] [--submit] [--set key=value ...]
    moeyard plan [CONFIG] [--world-size N] [--hardware FILE] [--set key=value ...]
    moeyard checkpoint inspect PATH | moeyard checkpoint export PATH --to DIR
    moeyard prepare SRC_DIR --out DATA_DIR [--glob '*.py']
    moeyard convert from-hf|to-hf|upcycle ... | moeyard sft-eval [CONFIG]   (launch/commands/tools.py)

Everything that can be checked without workers (config, world size, run dir,
corpus) is checked here first, so a mistake costs seconds, not a job.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from moeyard import configs
from moeyard.errors import CheckpointError, DataError, LaunchError, run_reporting
from moeyard.launch.commands.tools import add_convert_parser, add_prune_parser, add_sft_eval_parser
from moeyard.launch.env import in_slurm_step, single_process
from moeyard.launch.torchrun import Nodes, launch_workers
from moeyard.launch.worker import add_overrides
from moeyard.trainer.config import check_vocab, validate_for_world
from moeyard.trainer.data.tokens import default_cache_root, ensure_corpus, prepare_corpus, read_meta
from moeyard.trainer.run_config import resolve_config
from moeyard.trainer.run_dir import holds_a_run


def _worker_args(config: str, overrides: list[str], *extra: str) -> list[str]:
    args = [config, *extra]
    for assignment in overrides:
        args += ["--set", assignment]
    return args


def _node_rank(given: Optional[int], nnodes: int) -> int:
    """--node-rank, or under srun (one task per node) Slurm's node index."""
    if given is not None:
        return given
    if nnodes > 1 and in_slurm_step(os.environ) and "SLURM_NODEID" in os.environ:
        return int(os.environ["SLURM_NODEID"])
    return 0


def _check_gpus(backend: str, nproc: int) -> None:
    """One worker per GPU: say so here rather than from inside a worker after the others started."""
    import torch

    if backend == "gloo" or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise LaunchError(f"--nproc={nproc} workers on a node with {gpus} GPU(s): start at most {gpus}, or "
                          f"train on CPUs with --set parallel.backend=gloo")


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
                  args.rdzv_id or f"moeyard-{cfg.run.name}")
    nodes.check()
    if args.nproc is None and cfg.parallel.ep % nodes.count:
        raise LaunchError(f"--nnodes={nodes.count} does not divide parallel.ep={cfg.parallel.ep}: give --nproc, "
                          f"the workers per node")
    nproc = args.nproc or cfg.parallel.ep // nodes.count
    if nproc < 1:
        raise LaunchError(f"--nproc={nproc} must be >= 1")
    world = nproc * nodes.count
    validate_for_world(cfg, world)
    _check_gpus(cfg.parallel.backend, nproc)
    if cfg.checkpoint.resume == "none" and holds_a_run(cfg.run_dir) and nodes.rank == 0:
        raise LaunchError(f"run.dir {cfg.run_dir} already holds a run and --resume none was asked: resume it "
                          f"(--resume auto), choose another run.dir, or delete it")
    if cfg.sft.data is not None:
        from moeyard.trainer.data.sft_batches import SFTData

        SFTData(cfg)  # reads, renders and checks every conversation before a worker starts
    else:
        check_vocab(cfg, read_meta(ensure_corpus(cfg.data.source, cfg.data.dir, cfg.data.glob)))
    where = f"node {nodes.rank} of {nodes.count}, " if nodes.count > 1 else ""
    print(f"training {config} on {where}{nproc} process(es) (world {world}), ep={cfg.parallel.ep}; "
          f"run dir {cfg.run_dir}", flush=True)
    if world == 1:
        from moeyard.launch.worker import run_worker

        return run_worker(cfg, single_process())
    return launch_workers(nproc, _worker_args(config, args.overrides), nodes=nodes,
                          max_restarts=args.max_restarts, rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s,
                          run_dir=cfg.run_dir)


def _data_paths(cfg) -> tuple[Path, ...]:
    """What workers read besides the config: the corpus (or its source) and the cache it is prepared in."""
    from moeyard.trainer.data.sft_demo import DEMO
    from moeyard.trainer.data.tokens import STDLIB

    paths = []
    for path in (cfg.data.dir, cfg.data.source, cfg.sft.data, cfg.sft.tokenizer, cfg.checkpoint.init):
        if path and path not in (STDLIB, DEMO):
            paths.append(Path(path).resolve().parent)
    return tuple(paths)


def cmd_slurm(args: argparse.Namespace) -> int:
    from moeyard.launch.slurm import SlurmJob, render_sbatch, submit

    config = Path(args.config or configs.path("tiny.yaml")).resolve()
    cfg = resolve_config(config, args.overrides)
    nproc = args.nproc_per_node or args.gpus_per_node
    if nproc < 1:
        raise LaunchError("--gpus-per-node 0 (a CPU partition) needs --nproc-per-node, the workers per node")
    job = SlurmJob(config=config, run_dir=cfg.run_dir.resolve(), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, nproc_per_node=nproc, overrides=args.overrides,
                   layout=args.layout, partition=args.partition, time=args.time, account=args.account,
                   signal_lead_s=args.signal_lead, max_restarts=args.max_restarts,
                   job_name=f"moeyard-{cfg.run.name}", cpus_per_task=args.cpus_per_task,
                   data_paths=_data_paths(cfg), cache_dir=default_cache_root().resolve(),
                   container_image=args.container_image, apptainer_image=args.apptainer)
    script = render_sbatch(job)
    validate_for_world(cfg, job.world_size)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    if not args.submit:
        print(script, end="")
        return 0
    job_id = submit(script, cfg.run_dir / "job.sbatch")
    print(job_id)
    print(f"submitted job {job_id}; its log: {cfg.run_dir.resolve()}/slurm-{job_id}.out", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    config = args.config or str(configs.path("tiny.yaml"))
    cfg = resolve_config(config, args.overrides)
    world = args.world_size or cfg.parallel.ep
    validate_for_world(cfg, world)
    if args.hardware:
        from moeyard.trainer.tools.plan_report import hardware_report

        print(hardware_report(cfg, world, args.hardware))
        return 0
    if world == 1:
        from moeyard.launch.worker import run_worker

        run_worker(cfg, single_process(), plan_only=True)
        return 0
    return launch_workers(world, _worker_args(config, args.overrides, "--plan-only"),
                          rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from moeyard.trainer.tools.inspect import export_safetensors, inspect_checkpoint

    path = Path(args.path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (expected run_dir/checkpoints/step_NNNNNN)")
    if args.action == "inspect":
        print(inspect_checkpoint(path))
    else:
        if not args.to:
            raise LaunchError("moeyard checkpoint export needs --to DIR")
        print(f"wrote {export_safetensors(path, Path(args.to))}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds a prepared corpus; remove it or choose another --out")
    meta = prepare_corpus(Path(args.src), out, args.glob)
    print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens into {out}")
    return 0


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
    train.add_argument("--rdzv-id", default=None,
                       help="a job id, the same on every node (default: moeyard-<run.name>)")
    train.add_argument("--init", default=None, metavar="CKPT",
                       help="start a fresh run from these weights (moeyard convert output, a checkpoint, or a "
                            "run's checkpoints folder); the model config comes from it")
    train.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeyard", description="Expert-parallel MoE training.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: configs/tiny.yaml on 2 local processes)")
    _add_train_args(train, "tiny.yaml")
    sft = sub.add_parser("sft", help="instruction-tune a model from --init CKPT on the sft.data conversations "
                                     "(default: configs/sft-tiny.yaml)")
    _add_train_args(sft, "sft-tiny.yaml")

    slurm = sub.add_parser("slurm", help="render an sbatch script (or submit it) that trains, checkpoints before "
                                         "the time limit and requeues itself")
    slurm.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU partition")
    slurm.add_argument("--nproc-per-node", type=int, default=None,
                       help="workers per node (default: --gpus-per-node)")
    slurm.add_argument("--layout", choices=["torchrun", "srun"], default="torchrun",
                       help="torchrun: one task per node starting its workers (default); srun: one task per "
                            "worker")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--signal-lead", type=int, default=120,
                       help="seconds before the time limit at which Slurm sends SIGUSR1 (default 120)")
    slurm.add_argument("--max-restarts", type=int, default=0,
                       help="torchrun layout: restart all workers up to N times after a failure")
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="cores per Slurm task: a whole node's worth in the torchrun layout, one worker's in "
                            "the srun layout (default: the cluster's default, often 1)")
    slurm.add_argument("--container-image", default=None,
                       help="run every task in this image with pyxis/enroot, e.g. docker://ghcr.io/org/moeyard:0.1.0")
    slurm.add_argument("--apptainer", default=None, metavar="SIF",
                       help="run every task in this Apptainer image (apptainer exec --nv)")
    add_overrides(slurm)
    slurm.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    slurm.set_defaults(func=cmd_slurm)

    plan = sub.add_parser("plan", help="print the schedule plan and its predicted step time")
    plan.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    plan.add_argument("--world-size", type=int, default=None,
                      help="ranks to plan for (default: parallel.ep); without --hardware, that many local "
                           "processes are started and profiled")
    plan.add_argument("--hardware", default=None,
                      help="plan for a described machine (e.g. configs/hardware/dgx-h100.yaml) instead of "
                           "measuring this one")
    add_overrides(plan)
    plan.set_defaults(func=cmd_plan)

    checkpoint = sub.add_parser("checkpoint", help="inspect a checkpoint, or export it as safetensors")
    checkpoint.add_argument("action", choices=["inspect", "export"])
    checkpoint.add_argument("path", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step_000300")
    checkpoint.add_argument("--to", default=None, help="export: the folder to write (must be new or empty)")
    checkpoint.set_defaults(func=cmd_checkpoint)

    prepare = sub.add_parser("prepare", help="tokenize a folder of text files into token shards")
    prepare.add_argument("src", help="folder of text files, read recursively")
    prepare.add_argument("--out", required=True, help="folder to create with the token shards")
    prepare.add_argument("--glob", default="*.py", help="which files to read (default: *.py)")
    prepare.set_defaults(func=cmd_prepare)
    add_convert_parser(sub)
    add_sft_eval_parser(sub)
    add_prune_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting(lambda: args.func(args))
