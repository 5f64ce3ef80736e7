"""`moeyard plan`: the schedule plan and its predicted step time, measured here or for a described cluster."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from moeyard import configs
from moeyard.launch.env import single_process
from moeyard.launch.torchrun import launch_workers
from moeyard.launch.worker import RunSource, add_overrides, run_worker
from moeyard.trainer.config.resolve import machines_of, resolve_run, write_resolved
from moeyard.trainer.config.sections import read_config, validate_for_world


def cmd_plan(args: argparse.Namespace) -> int:
    config = args.config or str(configs.path("tiny.yaml"))
    world = args.world_size or read_config(config, args.overrides).parallel.ep
    if args.hardware:  # the described cluster's machines: the report lays the ranks out on them
        from moeyard.trainer.scheduler.report import hardware_report

        cfg = resolve_run(config, args.overrides)
        validate_for_world(cfg, world)
        print(hardware_report(cfg, world, args.hardware))
        return 0
    cfg = resolve_run(config, args.overrides, machines_of(world, world))  # `world` workers on this machine
    if world == 1:
        run_worker(RunSource(resolved=cfg), single_process(), plan_only=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="moeyard-plan-") as folder:
        resolved = write_resolved(cfg, Path(folder) / "node0.yaml")
        return launch_workers(world, [str(resolved), "--resolved", "--plan-only"],
                              rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
