"""`moeyard convert from-hf|to-hf|upcycle|merge-adapters`: single-process checkpoint conversions.

    moeyard convert from-hf HF_DIR --out CKPT
    moeyard convert to-hf CKPT --out HF_DIR [--dtype bfloat16]   (CKPT: a checkpoint, or a run's newest)
    moeyard convert upcycle DENSE_HF_DIR --out CKPT --experts E --top-k K [--granularity G]
    moeyard convert merge-adapters CKPT --out CKPT

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
        from moeyard.tools.merge_adapters import merge_adapters
        from moeyard.trainer.checkpoint.store import resolve_init

        report = merge_adapters(resolve_init(source), out)
        print(f"merged {len(report['merged'])} LoRA adapters into their linear maps; largest logit change on "
              f"{report['probe_tokens']} probe tokens: {report['max_logit_difference']:.2e} (float rounding)")
        print(f"wrote {out}: a plain model (model.peft.method=none) for --init, sft-eval or convert to-hf")
    elif args.action == "from-hf":
        from moeyard.tools.hf_convert import import_hf

        family, path = import_hf(source, out)
        print(f"converted {family} model {source} into {path}")
    elif args.action == "to-hf":
        import torch

        from moeyard.tools.hf_convert import export_hf
        from moeyard.trainer.checkpoint.store import resolve_init

        family, path = export_hf(resolve_init(source), out, getattr(torch, args.dtype) if args.dtype else None)
        print(f"wrote {family} model to {path} (transformers.AutoModelForCausalLM.from_pretrained loads it)")
    else:
        from moeyard.tools.upcycle import upcycle

        if args.experts is None or args.top_k is None:
            raise LaunchError("moeyard convert upcycle needs --experts E and --top-k K")
        path = upcycle(source, out, args.experts, args.top_k, args.granularity, args.seed)
        print(f"upcycled {source} into {args.experts} experts (top-{args.top_k}, granularity "
              f"{args.granularity}): {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="to-hf: cast the weights (default: the checkpoint's dtype, float32)")
    convert.set_defaults(func=cmd_convert)
