"""Pretraining data: text files -> memory-mapped token shards -> per-rank batches.

`prepare_corpus` writes uint16 shards and a `meta.json` into a temporary folder
and renames it into place when complete, so a half-written corpus is never
read. `TokenBatches` cuts the shards into fixed windows of seq_len + 1 tokens,
shuffles them once per epoch with the run's seed, and gives each data-parallel
rank its own contiguous slice of every global batch: no overlap between ranks,
and the ranks' slices in rank order are exactly the batch one process would use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moeyard.errors import DataError
from moeyard.trainer.checkpoint.store import is_plain_name
from moeyard.trainer.data.tokenizer import ByteTokenizer

FORMAT = "moeyard-tokens-v1"
STDLIB = "python-stdlib"
SHARD_TOKENS = 1 << 26  # 64 Mi tokens (128 MiB) per shard file


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


def _source_files(src: Path, glob: str) -> Iterator[Path]:
    """Files in a stable order; skips installed third-party packages and caches."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for path in sorted(src.rglob(glob)):
        rel = path.relative_to(src)
        if path.is_file() and not path.is_symlink() and not skip.intersection(rel.parts):
            yield path


def source_fingerprint(src: Path, glob: str) -> str:
    """What the corpus was made from: every source file's path, size and modification time (a stat per
    file, no reading), so a cached corpus is rebuilt when its source changes."""
    digest = hashlib.sha256()
    for path in _source_files(src, glob):
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


def prepare_corpus(src: Path, out: Path, glob: str = "*.py") -> dict:
    """Tokenize every matching file under `src` (bytes, end-of-text between files) into `out`."""
    if not src.is_dir():
        raise DataError(f"data source {src} is not a directory: set data.source to a folder of text files")
    tok = ByteTokenizer()
    fingerprint = source_fingerprint(src, glob)
    eos = np.array([tok.eos_id], dtype=np.uint16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict] = []
        pending: list[np.ndarray] = []
        pending_tokens = documents = total = 0

        def flush() -> None:
            nonlocal pending, pending_tokens
            if pending:
                name = f"tokens_{len(shards):05d}.bin"
                np.concatenate(pending).tofile(tmp / name)
                shards.append({"file": name, "tokens": pending_tokens})
                pending, pending_tokens = [], 0

        for path in _source_files(src, glob):
            try:
                data = path.read_bytes()
            except OSError:
                continue  # unreadable file (permissions, vanished): not part of the corpus
            # Byte-level: token id == byte value, then one end-of-text token.
            pending += [np.frombuffer(data, dtype=np.uint8).astype(np.uint16), eos]
            pending_tokens += len(data) + 1
            documents += 1
            total += len(data) + 1
            if pending_tokens >= SHARD_TOKENS:
                flush()
        flush()
        if documents == 0:
            raise DataError(f"no files matching {glob!r} under {src}: check data.source and data.glob")
        meta = {"format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": "uint16",
                "source": str(src), "glob": glob, "source_fingerprint": fingerprint, "documents": documents,
                "tokens": total, "shards": shards}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _move_into_place(tmp, out)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished corpus to `out`; if another process got there first, keep theirs. A corpus of
    an older source there is moved aside first (runs reading it keep their open files)."""
    if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared corpus: remove it or choose another folder")
    if (out / "meta.json").is_file():
        new_source = json.loads((tmp / "meta.json").read_text()).get("source_fingerprint")
        if json.loads((out / "meta.json").read_text()).get("source_fingerprint") != new_source:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, out)  # atomic; also replaces an empty folder
    except OSError:
        if not (out / "meta.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process (or node sharing the cache) finished first


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
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r}: {again}")
    vocab, shards = meta.get("vocab_size"), meta.get("shards")
    if not (isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0):
        raise DataError(f"{meta_path}: vocab_size={vocab!r} is not a positive integer: {again}")
    if not (isinstance(shards, list) and shards and all(
            isinstance(s, dict) and is_plain_name(s.get("file")) and isinstance(s.get("tokens"), int)
            and not isinstance(s.get("tokens"), bool) and s["tokens"] > 0 for s in shards)):
        raise DataError(f"{meta_path}: shards must be a non-empty list of {{file: a name in {data_dir}, tokens: "
                        f"a positive count}}: {again}")
    for shard in shards:
        size = (data_dir / shard["file"]).stat().st_size if (data_dir / shard["file"]).exists() else -1
        if size != 2 * shard["tokens"]:
            raise DataError(f"shard {data_dir / shard['file']} is missing or truncated: prepare the corpus again")
    return meta


class TokenBatches:
    """Deterministic global batches of windows; each rank reads only its own slice."""

    def __init__(self, data_dir: Path, seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> None:
        meta = read_meta(data_dir)
        self.vocab_size: int = meta["vocab_size"]
        self.shards = [np.memmap(data_dir / s["file"], dtype=np.uint16, mode="r") for s in meta["shards"]]
        self.window = seq_len + 1
        check_corpus_size(data_dir, meta, seq_len, global_batch)
        self.offsets = np.cumsum([0] + windows(meta, seq_len))
        self.num_windows = int(self.offsets[-1])
        self.seq_len, self.global_batch = seq_len, global_batch
        self.steps_per_epoch = self.num_windows // global_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        return self.shards[shard][start:start + self.window]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_windows, generator=g).numpy()
            self._epoch = epoch
        return self._order

    def window_ids(self, step: int) -> list[int]:
        """Which windows of the corpus make up this rank's share of global batch `step`.

        An epoch is a whole number of global batches (the few windows left over
        change from epoch to epoch), so no batch straddles two shuffles.
        """
        epoch, within = divmod(step, self.steps_per_epoch)
        per_rank = self.global_batch // self.dp_size
        first = within * self.global_batch + self.dp_rank * per_rank
        return self._epoch_order(epoch)[first:first + per_rank].tolist()

    def batch(self, step: int) -> torch.Tensor:
        """This rank's [global_batch / dp, seq_len + 1] int64 tokens of global batch `step`."""
        rows = [self._window(i) for i in self.window_ids(step)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def ensure_corpus(source: str | None, data_dir: str | None, glob: str) -> Path:
    """The prepared corpus folder for a data config, tokenizing data.source on first use.

    A data.dir without a corpus is only filled when data.source says from what:
    a mistyped data.dir must not quietly become a new corpus of something else.
    """
    if data_dir is None and source is None:
        raise DataError("set data.dir to a prepared corpus or data.source to a folder of text files")
    out = Path(data_dir) if data_dir else default_data_dir(source, glob)
    if source is not None and (out / "meta.json").is_file():
        src = resolve_source(source)
        try:
            meta = json.loads((out / "meta.json").read_bytes())
        except ValueError:  # damaged: read_meta below says so
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        made_from_it = (meta.get("source"), meta.get("glob")) == (str(src), glob)  # else data.dir wins as is
        if made_from_it and src.is_dir() and meta.get("source_fingerprint") != source_fingerprint(src, glob):
            print(f"data.source {src} changed since {out} was prepared from it: preparing it again", flush=True)
            meta = prepare_corpus(src, out, glob)
            print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens", flush=True)
    if not (out / "meta.json").is_file():
        if source is None:
            raise DataError(f"data.dir={out} holds no prepared corpus: run `moeyard prepare SRC --out {out}` "
                            f"or set data.source")
        src = resolve_source(source)
        print(f"preparing corpus from {src} ({glob}) into {out} ...", flush=True)
        meta = prepare_corpus(src, out, glob)
        print(f"prepared {meta['documents']} files, {meta['tokens']:,} tokens", flush=True)
    read_meta(out)
    return out
