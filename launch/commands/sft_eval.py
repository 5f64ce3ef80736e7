"""`moeyard sft-eval [CONFIG] [--checkpoint CKPT ...] [--limit N]`: held-out exact match before and after
tuning."""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard import configs
from moeyard.errors import LaunchError
from moeyard.launch.worker import add_overrides
from moeyard.trainer.config.resolve import resolve_run


def cmd_sft_eval(args: argparse.Namespace) -> int:
    from moeyard.tools.sft_eval import exact_match
    from moeyard.trainer.checkpoint.store import CheckpointStore

    cfg = resolve_run(args.config or configs.path("sft-tiny.yaml"), args.overrides)
    if cfg.sft.data is None:
        raise LaunchError("the config has no sft.data: nothing to evaluate on")
    checkpoints = [Path(c) for c in args.checkpoint]
    if not checkpoints:  # before and after: the starting weights and the run's newest checkpoint
        checkpoints = [Path(cfg.checkpoint.init)] if cfg.checkpoint.init else []
        newest = CheckpointStore(cfg.run_dir / "checkpoints").newest_intact().path
        checkpoints += [newest] if newest else []
    if not checkpoints:
        raise LaunchError("no checkpoint to evaluate: pass --checkpoint CKPT")
    for ckpt in checkpoints:
        result = exact_match(cfg, ckpt, args.limit, skip_threshold=args.skip_threshold)
        skipping = ""
        if result.skip_threshold:
            skipping = (f"; expert skipping below weight {result.skip_threshold} left out "
                        f"{result.skipped_fraction:.1%} of expert computations")
        print(f"{ckpt}: exact match {result.accuracy:.1%} on {result.examples} held-out examples{skipping}")
        for expected, got in result.samples[:args.show]:
            print(f"    expected {expected!r}\n    got      {got!r}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:

    sft_eval = sub.add_parser("sft-eval", help="exact-match accuracy on the held-out split of an SFT config "
                                               "(default: before and after tuning)")
    sft_eval.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/sft-tiny.yaml)")
    sft_eval.add_argument("--checkpoint", action="append", default=[],
                          help="a checkpoint to evaluate (repeatable; default: checkpoint.init and the run's "
                               "newest checkpoint)")
    sft_eval.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out examples only")
    sft_eval.add_argument("--show", type=int, default=3, help="print N expected/got pairs per checkpoint")
    sft_eval.add_argument("--skip-threshold", type=float, default=None,
                          help="dynamic expert skipping: leave out a token's second expert when its routing weight "
                               "is below this, and report the fraction skipped (default: the checkpoint's "
                               "model.moe.skip_threshold)")
    add_overrides(sft_eval)
    sft_eval.set_defaults(func=cmd_sft_eval)
