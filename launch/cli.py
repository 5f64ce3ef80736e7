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
import importlib
import sys
from typing import Optional, Sequence

from moeyard.errors import run_reporting

COMMANDS = {"train": "train", "sft": "train", "slurm": "slurm", "plan": "plan", "checkpoint": "checkpoint",
            "prepare": "prepare", "convert": "convert", "sft-eval": "sft_eval", "prune": "prune"}
"""Subcommand -> its module in moeyard.launch.commands, in the order `moeyard --help` lists them; each
module's add_parser registers its subcommands."""


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """All subcommands, or only `command`'s module: `moeyard prepare` need not import torch (seconds)."""
    parser = argparse.ArgumentParser(prog="moeyard", description="Expert-parallel MoE training.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"moeyard.launch.commands.{module}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return run_reporting(lambda: args.func(args))
