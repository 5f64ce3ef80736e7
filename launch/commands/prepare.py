"""`moeyard prepare`: tokenize text (folders, JSONL, Parquet, save_to_disk datasets) into token shards."""
from __future__ import annotations

import argparse
from pathlib import Path

from moeyard.errors import DataError
from moeyard.trainer.data.corpus import PrepareOptions, prepare_corpus
from moeyard.trainer.data.tokens import verify_corpus


def cmd_verify(folder: Path) -> int:
    """`moeyard prepare --verify DIR`: every shard against its recorded sha256, ids against the vocabulary."""
    problems = verify_corpus(folder)
    for problem in problems:
        print(problem)
    print(f"{folder}: {'damaged, prepare it again' if problems else 'intact'}")
    return 1 if problems else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.verify:
        return cmd_verify(Path(args.verify))
    if not args.sources or not args.out:
        raise DataError("moeyard prepare needs SOURCE... and --out (or --verify DIR to check a corpus)")
    out = Path(args.out)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds a prepared corpus; remove it or choose another --out")
    if args.workers < 1:
        raise DataError(f"--workers={args.workers} must be >= 1")
    twice = sorted({s for s in args.sources if args.sources.count(s) > 1})
    if twice:
        raise DataError(f"{twice} given twice: each source is read once")
    opts = PrepareOptions(tokenizer=Path(args.tokenizer) if args.tokenizer else None, text_field=args.field,
                          glob=args.glob, workers=args.workers, skip_malformed=args.skip_malformed, progress=True)
    meta = prepare_corpus([Path(s) for s in args.sources], out, opts)
    run = meta["prepare"]
    skipped = f", {meta['skipped']} malformed records skipped (first: {meta['skipped_examples'][0]})" \
        if meta["skipped"] else ""
    print(f"prepared {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']}, tokenizer "
          f"{meta['tokenizer']['name']}, vocabulary {meta['vocab_size']:,}) into {out} in {run['seconds']:.1f} s: "
          f"{run['tokens_per_s']:,} tokens/s, {run['text_bytes'] / 2**20 / max(run['seconds'], 1e-9):.1f} MB/s"
          f"{skipped}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    prepare = sub.add_parser("prepare", help="tokenize text (folders, JSONL, Parquet, Arrow) into token shards")
    prepare.add_argument("sources", nargs="*", metavar="SOURCE",
                         help="a folder of text files (read recursively, see --glob), a .jsonl or .jsonl.gz file, "
                              "a .parquet file, or a folder written by datasets' save_to_disk")
    prepare.add_argument("--out", help="folder to create with the token shards")
    prepare.add_argument("--verify", metavar="DIR", help="check a prepared corpus instead: every shard against the "
                                                         "sha256 its meta.json records, every id against the "
                                                         "vocabulary (exit 1 if damaged)")
    prepare.add_argument("--tokenizer", help="a local Hugging Face tokenizer folder (with tokenizer.json); "
                                             "default: the byte tokenizer")
    prepare.add_argument("--field", default="text", help="the text field of JSONL records, or column of a table "
                                                         "(default: text)")
    prepare.add_argument("--glob", default="*.py", help="which files of a folder source are read (default: *.py)")
    prepare.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    prepare.add_argument("--skip-malformed", action="store_true",
                         help="skip and count malformed records (bad JSON, missing field, invalid UTF-8) instead "
                              "of stopping at the first")
    prepare.set_defaults(func=cmd_prepare)
