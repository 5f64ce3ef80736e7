"""`moeyard prepare`: tokenize a folder of text files into token shards."""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard.errors import DataError
from moeyard.trainer.data.tokens import prepare_corpus


def cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds a prepared corpus; remove it or choose another --out")
    meta = prepare_corpus(Path(args.src), out, args.glob)
    print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens into {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser("prepare", help="tokenize a folder of text files into token shards")
    prepare.add_argument("src", help="folder of text files, read recursively")
    prepare.add_argument("--out", required=True, help="folder to create with the token shards")
    prepare.add_argument("--glob", default="*.py", help="which files to read (default: *.py)")
    prepare.set_defaults(func=cmd_prepare)
