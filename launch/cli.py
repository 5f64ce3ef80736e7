"""The `moeyard` command.

    moeyard train [CONFIG] [--nproc N] [--set key=value ...]
    moeyard plan [CONFIG] [--world-size N] [--hardware FILE] [--set key=value ...]
    moeyard checkpoint inspect PATH | moeyard checkpoint export PATH --to DIR
    moeyard prepare SRC_DIR --out DATA_DIR [--glob '*.py']

Everything that can be checked without workers (config, world size, run dir,
corpus) is checked here first, so a mistake costs seconds, not a job.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from moeyard import configs
from moeyard.models import ConfigError
from moeyard.trainer.config import check_vocab, load_config, validate_for_world
from moeyard.trainer.data import DataError, ensure_corpus, prepare_corpus, read_meta
from moeyard.trainer.checkpoint_store import CheckpointError
from moeyard.trainer.loop import PREEMPTED, NonFiniteStop, holds_a_run

from .env import DistEnv, LaunchError


def _worker_pids() -> list[int]:
    """This process's children that run moeyard.train (Linux /proc)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"moeyard.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def _forward_to_workers(signum: int, frame) -> None:
    """torchrun forwards SIGTERM but not SIGUSR1 (Slurm's warning before the time limit): pass it on, so the
    workers checkpoint at the next step boundary and exit."""
    for pid in _worker_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _spawn_local_workers(nproc: int, config: str, overrides: list[str], *extra: str, max_restarts: int = 0,
                         run_dir: Path | None = None) -> int:
    """Start `nproc` workers on this machine through torch.distributed.run (torchrun)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    argv = ["--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "-m", "moeyard.train",
            config, *extra]
    for assignment in overrides:
        argv += ["--set", assignment]
    previous = signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        run(get_args_parser().parse_args(argv))
        if run_dir is not None and (run_dir / PREEMPTED).exists():
            stopped = json.loads((run_dir / PREEMPTED).read_text())
            print(f"workers saved step {stopped['step']} and stopped on {signal.Signals(stopped['signal']).name}; "
                  f"run the same command to resume", file=sys.stderr)
            return 128 + stopped["signal"]
    except ChildFailedError as err:
        failures = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(err.failures.items()))
        print(f"error: training workers failed ({failures}); see their messages above", file=sys.stderr)
        return 1
    except SignalException as err:  # the launcher itself was told to stop; workers checkpoint on their way out
        print(f"stopped by {signal.Signals(err.sigval).name}; run the same command to resume", file=sys.stderr)
        return 128 + err.sigval
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = args.config or str(configs.path("tiny.yaml"))
    if args.resume is not None:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(config, args.overrides)
    nproc = args.nproc or cfg.parallel.ep
    if nproc < 1:
        raise LaunchError(f"--nproc={nproc} must be >= 1")
    validate_for_world(cfg, nproc)
    if cfg.checkpoint.resume == "none" and holds_a_run(cfg.run_dir):
        raise LaunchError(f"run.dir {cfg.run_dir} already holds a run and --resume none was asked: resume it "
                          f"(--resume auto), choose another run.dir, or delete it")
    check_vocab(cfg, read_meta(ensure_corpus(cfg.data.source, cfg.data.dir, cfg.data.glob)))
    print(f"training {config} on {nproc} process(es), ep={cfg.parallel.ep}; run dir {cfg.run_dir}", flush=True)
    if nproc == 1:
        from .worker import run_worker

        return run_worker(cfg, DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    return _spawn_local_workers(nproc, config, args.overrides, max_restarts=args.max_restarts, run_dir=cfg.run_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    config = args.config or str(configs.path("tiny.yaml"))
    cfg = load_config(config, args.overrides)
    world = args.world_size or cfg.parallel.ep
    validate_for_world(cfg, world)
    if args.hardware:
        from moeyard.trainer.plan_report import hardware_report

        print(hardware_report(cfg, world, args.hardware))
        return 0
    if world == 1:
        from .worker import run_worker

        run_worker(cfg, DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"), plan_only=True)
        return 0
    return _spawn_local_workers(world, config, args.overrides, "--plan-only")


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from moeyard.trainer.checkpoint_tools import export_safetensors, inspect_checkpoint

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeyard", description="Expert-parallel MoE training.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: configs/tiny.yaml on 2 local processes)")
    train.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    train.add_argument("--nproc", type=int, default=None,
                       help="local worker processes (default: parallel.ep of the config)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    train.add_argument("--resume", default=None, metavar="auto|none|PATH",
                       help="auto (default): continue from the newest intact checkpoint of run.dir; none: start "
                            "fresh; PATH: start from that checkpoint")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="restart all workers up to N times after a failure; each restart resumes from the "
                            "newest checkpoint (torchrun's --max-restarts)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print the schedule plan and its predicted step time")
    plan.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    plan.add_argument("--world-size", type=int, default=None,
                      help="ranks to plan for (default: parallel.ep); without --hardware, that many local "
                           "processes are started and profiled")
    plan.add_argument("--hardware", default=None,
                      help="plan for a described machine (e.g. configs/hardware/dgx-h100.yaml) instead of "
                           "measuring this one")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable)")
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, LaunchError, CheckpointError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteStop as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
