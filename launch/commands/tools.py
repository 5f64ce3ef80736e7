"""Single-process model tools: `moeyard convert` (Hugging Face import/export, dense->MoE upcycling) and
`moeyard sft-eval` (held-out exact match).

    moeyard convert from-hf HF_DIR --out CKPT
    moeyard convert to-hf CKPT --out HF_DIR
    moeyard convert upcycle DENSE_HF_DIR --out CKPT --experts E --top-k K [--granularity G]
    moeyard convert merge-adapters CKPT --out CKPT
    moeyard sft-eval [CONFIG] [--checkpoint CKPT ...] [--limit N]
    moeyard prune CKPT --data DATA (--keep N | --keep-per-layer N1,N2,..) --out OUT

CKPT is a weights-only moeyard checkpoint: `moeyard sft CONFIG --init CKPT` (or `train --init`) starts
from it at any world size and ep.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard.errors import LaunchError


def cmd_convert(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.out)
    if not source.is_dir():
        raise LaunchError(f"{source} is not a folder")
    if args.action == "merge-adapters":
        from moeyard.trainer.checkpoint.weights import resolve_init
        from moeyard.trainer.tools.merge_adapters import merge_adapters

        report = merge_adapters(resolve_init(source), out)
        print(f"merged {len(report['merged'])} LoRA adapters into their linear maps; largest logit change on "
              f"{report['probe_tokens']} probe tokens: {report['max_logit_difference']:.2e} (float rounding)")
        print(f"wrote {out}: a plain model (model.peft.method=none) for --init, sft-eval or convert to-hf")
    elif args.action == "from-hf":
        from moeyard.trainer.tools.hf_convert import import_hf

        family, path = import_hf(source, out)
        print(f"converted {family} model {source} into {path}")
    elif args.action == "to-hf":
        from moeyard.trainer.tools.hf_convert import export_hf

        family, path = export_hf(source, out)
        print(f"wrote {family} model to {path} (transformers.AutoModelForCausalLM.from_pretrained loads it)")
    else:
        from moeyard.trainer.tools.upcycle import upcycle

        if args.experts is None or args.top_k is None:
            raise LaunchError("moeyard convert upcycle needs --experts E and --top-k K")
        path = upcycle(source, out, args.experts, args.top_k, args.granularity, args.seed)
        print(f"upcycled {source} into {args.experts} experts (top-{args.top_k}, granularity "
              f"{args.granularity}): {path}")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="import/export Hugging Face models, upcycle a dense one into an MoE, "
                                              "or fold LoRA adapters into the base weights")
    convert.add_argument("action", choices=["from-hf", "to-hf", "upcycle", "merge-adapters"])
    convert.add_argument("source", help="from-hf/upcycle: a save_pretrained folder; to-hf/merge-adapters: a moeyard "
                                        "checkpoint (or run folder)")
    convert.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty for to-hf)")
    convert.add_argument("--experts", type=int, default=None, help="upcycle: experts per MoE layer")
    convert.add_argument("--top-k", type=int, default=None, help="upcycle: experts per token")
    convert.add_argument("--granularity", type=int, default=1,
                         help="upcycle: cut each MLP into G slices, one per expert (default 1: whole copies)")
    convert.add_argument("--seed", type=int, default=0, help="upcycle: seed of the router's initial rows")
    convert.set_defaults(func=cmd_convert)


def cmd_prune(args: argparse.Namespace) -> int:
    from moeyard.trainer.checkpoint.weights import resolve_init
    from moeyard.trainer.tools.prune import prune

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


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
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


def cmd_sft_eval(args: argparse.Namespace) -> int:
    from moeyard import configs
    from moeyard.trainer.checkpoint.store import CheckpointStore
    from moeyard.trainer.run_config import resolve_config
    from moeyard.trainer.tools.sft_eval import exact_match

    cfg = resolve_config(args.config or configs.path("sft-tiny.yaml"), args.overrides)
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


def add_sft_eval_parser(sub: argparse._SubParsersAction) -> None:
    from moeyard.launch.worker import add_overrides

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
