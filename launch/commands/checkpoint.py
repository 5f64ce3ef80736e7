"""`moeyard checkpoint inspect|export`: describe a checkpoint (exit code 2 when it is damaged), or export it
as safetensors."""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard.errors import BAD_INPUT, CheckpointError, LaunchError


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from moeyard.tools.inspect_checkpoint import export_safetensors, inspect_checkpoint

    path = Path(args.path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (expected run_dir/checkpoints/step_NNNNNN)")
    if args.action == "inspect":
        report, intact = inspect_checkpoint(path)
        print(report)
        return 0 if intact else BAD_INPUT
    else:
        if not args.to:
            raise LaunchError("moeyard checkpoint export needs --to DIR")
        print(f"wrote {export_safetensors(path, Path(args.to))}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    checkpoint = sub.add_parser("checkpoint", help="inspect a checkpoint, or export it as safetensors")
    checkpoint.add_argument("action", choices=["inspect", "export"])
    checkpoint.add_argument("path", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step_000300")
    checkpoint.add_argument("--to", default=None, help="export: the folder to write (must be new or empty)")
    checkpoint.set_defaults(func=cmd_checkpoint)
