"""Prepared corpora on disk: where the cache keeps them, what their meta.json must say, and preparing
data.source on first use.

`moeyard.trainer.data.corpus` writes corpora; `moeyard.trainer.data.blend` reads batches from them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

from moeyard.errors import DataError
from moeyard.trainer.checkpoint.store import is_plain_name
from moeyard.trainer.data.corpus import FORMAT, PrepareOptions, prepare_corpus
from moeyard.trainer.data.sources import file_sha256, folder_files

STDLIB = "python-stdlib"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_source(source: str) -> Path:
    return stdlib_dir() if source == STDLIB else Path(source)


def default_cache_root() -> Path:
    """$MOEYARD_CACHE, else $XDG_CACHE_HOME/moeyard, else ~/.cache/moeyard."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("MOEYARD_CACHE", xdg / "moeyard"))


def default_data_dir(source: str, glob: str) -> Path:
    """A per-machine cache folder keyed by what would be read."""
    cache = default_cache_root()
    if source == STDLIB:
        tag = f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    else:
        tag = Path(source).name or "corpus"
    digest = hashlib.sha256(f"{resolve_source(source).resolve()}|{glob}".encode()).hexdigest()[:10]
    return cache / "data" / f"{tag}-{digest}"


def source_fingerprint(src: Path, glob: str) -> str:
    """What the corpus was made from: every source file's path, size and modification time (a stat per
    file, no reading), so a cached corpus is rebuilt when its source changes."""
    digest = hashlib.sha256()
    for path in folder_files(src, glob):
        stat = path.stat()
        digest.update(f"{path.relative_to(src)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def windows(meta: dict, seq_len: int) -> list[int]:
    """Training sequences per shard: windows start every seq_len tokens and never cross a shard."""
    return [max(0, (s["tokens"] - 1) // seq_len) for s in meta["shards"]]


def check_corpus_size(data_dir: Path, meta: dict, seq_len: int, global_batch: int) -> None:
    found = sum(windows(meta, seq_len))
    if found < global_batch:
        raise DataError(f"the corpus in {data_dir} has {found} sequences of {seq_len} tokens, fewer than one "
                        f"global batch ({global_batch}): use more data or a smaller batch")


def prepare_folder(src: Path, out: Path, glob: str = "*.py") -> dict:
    """Tokenize every matching file under the folder `src` with the byte tokenizer into `out`."""
    if not src.is_dir():
        raise DataError(f"data source {src} is not a directory: set data.source to a folder of text files")
    return prepare_corpus([src], out, PrepareOptions(glob=glob), fingerprint=source_fingerprint(src, glob))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_meta(data_dir: Path) -> dict:
    """The corpus description, checked (it may be damaged or hand-edited) against the shards beside it."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} holds no prepared corpus (no meta.json): run `moeyard prepare SRC --out {data_dir}`")
    again = f"prepare the corpus again (moeyard prepare SRC --out {data_dir})"
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{meta_path} is not valid JSON ({err}): {again}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r} (an older moeyard wrote it, or it "
                        f"is not a corpus): {again}")
    vocab, shards, tokenizer = meta.get("vocab_size"), meta.get("shards"), meta.get("tokenizer")
    if not (_is_count(vocab) and vocab > 0 and isinstance(tokenizer, dict) and isinstance(tokenizer.get("hash"), str)
            and meta.get("dtype") in ("uint16", "uint32") and tokenizer.get("dir") in (None, "tokenizer")):
        raise DataError(f"{meta_path}: vocab_size, dtype or tokenizer is missing or malformed: {again}")
    if not (isinstance(shards, list) and shards and all(
            isinstance(s, dict) and is_plain_name(s.get("file")) and is_plain_name(s.get("index"))
            and _is_count(s.get("tokens")) and s["tokens"] > 0 and _is_count(s.get("documents")) for s in shards)):
        raise DataError(f"{meta_path}: shards must be a non-empty list of {{file, index: names in {data_dir}, "
                        f"tokens, documents: counts}}: {again}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shard in shards:
        for name, size in ((shard["file"], itemsize * shard["tokens"]), (shard["index"], 8 * shard["documents"])):
            found = (data_dir / name).stat().st_size if (data_dir / name).is_file() else -1
            if found != size:
                raise DataError(f"shard file {data_dir / name} is missing or truncated ({found} bytes, {size} "
                                f"expected): {again}")
    return meta


def index_problem(starts: np.ndarray, tokens: int) -> str | None:
    """Why a shard's document index is not one (first document at 0, strictly increasing, inside the
    shard), or None."""
    if len(starts) and (starts[0] != 0 or starts[-1] >= tokens or np.any(np.diff(starts) <= 0)):
        return "its document starts are not increasing from 0 inside the shard"
    return None


def verify_corpus(data_dir: Path) -> list[str]:
    """What is damaged in a prepared corpus: each shard against the sha256 meta.json records for it (its
    document index too, where recorded), every id below the vocabulary, every index well formed. Reads
    every byte once; `moeyard prepare --verify DIR` runs it."""
    meta = read_meta(data_dir)
    dtype, vocab, problems = np.dtype(meta["dtype"]), meta["vocab_size"], []
    for shard in meta["shards"]:
        path, index = data_dir / shard["file"], data_dir / shard["index"]
        if file_sha256(path) != shard.get("sha256"):
            problems.append(f"{path} does not match the sha256 meta.json records for it (changed or corrupted)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        top = max((int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24)), default=0)
        if top >= vocab:
            problems.append(f"{path} holds token id {top}, outside the vocabulary of {vocab}")
        if "index_sha256" in shard and file_sha256(index) != shard["index_sha256"]:
            problems.append(f"{index} does not match the sha256 meta.json records for it (changed or corrupted)")
        bad = index_problem(np.fromfile(index, dtype=np.int64), shard["tokens"])
        if bad:
            problems.append(f"{index}: {bad}")
    return problems


def _stale(out: Path, src: Path, glob: str) -> bool:
    """The cached corpus at `out` was made from the folder `src` and no longer matches it (changed files, or
    a format this moeyard no longer reads); False when `out` was made from something else (data.dir wins)
    or by a user (`moeyard prepare` records no source fingerprint: that corpus is never prepared again)."""
    try:
        meta = json.loads((out / "meta.json").read_bytes())
    except ValueError:  # damaged: read_meta says so
        return False
    if not isinstance(meta, dict):
        return False
    old_form = meta.get("source") == str(src)  # format v1 kept the one source folder here
    made_from_it = old_form or meta.get("source_fingerprint") and (
        [s.get("path") for s in meta.get("sources", [])], meta.get("glob")) == ([str(src.resolve())], glob)
    return made_from_it and src.is_dir() and (
        meta.get("format") != FORMAT or meta.get("source_fingerprint") != source_fingerprint(src, glob))


def corpus_dir(source: str | None, data_dir: str | None, glob: str) -> Path:
    """Where the data config's prepared corpus is (data.dir, else the cache's folder for data.source)."""
    if data_dir is None and source is None:
        raise DataError("set data.dir to a prepared corpus or data.source to a folder of text files")
    return Path(data_dir) if data_dir else default_data_dir(source, glob)


def ensure_corpus(source: str | None, data_dir: str | None, glob: str) -> Path:
    """The prepared corpus folder for a data config, tokenizing data.source on first use.

    A data.dir without a corpus is only filled when data.source says from what:
    a mistyped data.dir must not quietly become a new corpus of something else.
    """
    out = corpus_dir(source, data_dir, glob)
    if source is not None and (out / "meta.json").is_file() and _stale(out, resolve_source(source), glob):
        print(f"data.source {resolve_source(source)} changed since {out} was prepared from it: preparing it again",
              flush=True)
        meta = prepare_folder(resolve_source(source), out, glob)
        print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens", flush=True)
    if not (out / "meta.json").is_file():
        if source is None:
            raise DataError(f"data.dir={out} holds no prepared corpus: run `moeyard prepare SRC --out {out}` "
                            f"or set data.source")
        src = resolve_source(source)
        print(f"preparing corpus from {src} ({glob}) into {out} ...", flush=True)
        meta = prepare_folder(src, out, glob)
        print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens", flush=True)
    read_meta(out)
    return out
