"""The `moeyard` command: one parser, one module per command family in launch/commands/.

    moeyard train|sft [CONFIG] [--init CKPT] [--nproc N] [--nnodes N --node-rank I --rdzv-endpoint HOST:PORT] [--set key=value ...]
    moeyard slurm [CONFIG] --nodes N --gpus-per-node G [--nproc-per-node P] [--submit] [--set key=value ...]
    moeyard plan [CONFIG] [--world-size N] [--hardware FILE] [--set key=value ...]
    moeyard checkpoint inspect PATH | moeyard checkpoint export PATH --to DIR
    moeyard prepare SRC_DIR --out DATA_DIR [--glob '*.py']
    moeyard convert from-hf|to-hf|upcycle|merge-adapters ... | moeyard sft-eval [CONFIG] | moeyard prune ...

Everything that can be checked without workers (config, world size, run dir,
corpus) is checked first, so a mistake costs seconds, not a job.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from moeyard.errors import run_reporting
from moeyard.launch.commands import checkpoint, convert, plan, prepare, prune, sft_eval, slurm, train

COMMANDS = (train, slurm, plan, checkpoint, prepare, convert, sft_eval, prune)
"""In the order `moeyard --help` lists them; each module's add_parser registers its subcommands."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeyard", description="Expert-parallel MoE training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting(lambda: args.func(args))
