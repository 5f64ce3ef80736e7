"""`moeyard prune CKPT --data DATA (--keep N | --keep-per-layer N1,N2,..) --out OUT`: keep each MoE
layer's most used experts."""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard.errors import LaunchError


def cmd_prune(args: argparse.Namespace) -> int:
    from moeyard.tools.prune import prune
    from moeyard.trainer.checkpoint.store import resolve_init

    keep = args.keep
    if args.keep_per_layer is not None:
        try:
            keep = [int(n) for n in args.keep_per_layer.split(",")]
        except ValueError:
            raise LaunchError(f"--keep-per-layer {args.keep_per_layer!r} must be comma-separated integers, one per "
                              f"MoE layer, e.g. 4,6,8") from None
    report = prune(resolve_init(Path(args.checkpoint)), args.data, keep, Path(args.out),
                   args.calibration_batches, args.heldout_batches)
    before, after = report["heldout_loss_before"], report["heldout_loss_after"]
    for layer, ids in report["kept_experts"].items():
        print(f"layer {layer}: kept experts {ids}")
    print(f"held-out loss {before:.4f} -> {after:.4f} ({after - before:+.4f}) on {report['heldout_tokens']} tokens")
    print(f"wrote {args.out}: train or tune it with --init {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="keep each MoE layer's most used experts on a calibration set")
    p.add_argument("checkpoint", help="a moeyard checkpoint, or a run folder (its newest checkpoint)")
    p.add_argument("--data", required=True,
                   help="calibration text: python-stdlib, a folder of text files, or a prepared corpus folder")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=int, help="experts to keep in every MoE layer")
    budget.add_argument("--keep-per-layer", help="experts to keep in each MoE layer, in order, e.g. 4,6,8")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches of 8 sequences that measure usage")
    p.add_argument("--heldout-batches", type=int, default=4, help="further batches the losses are measured on")
    p.set_defaults(func=cmd_prune)
