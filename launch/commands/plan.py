"""`moeyard plan`: the schedule plan and its predicted step time, measured here or for a described cluster."""
from __future__ import annotations

import argparse

from moeyard import configs
from moeyard.launch.env import single_process
from moeyard.launch.torchrun import launch_workers
from moeyard.launch.worker import add_overrides, run_worker, worker_args
from moeyard.trainer.config import validate_for_world
from moeyard.trainer.run_config import resolve_config


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
        run_worker(cfg, single_process(), plan_only=True)
        return 0
    return launch_workers(world, worker_args(config, args.overrides, "--plan-only"),
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
