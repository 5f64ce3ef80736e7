"""`moeyard prepare`: sources -> token shards with a document index, written atomically.

A corpus folder holds `tokens_NNNNN.bin` (uint16 when the vocabulary fits in 16 bits, else uint32),
beside each a `docs_NNNNN.bin` of int64 document starts (a document never crosses a shard), the
tokenizer's files under `tokenizer/`, and `meta.json` (tokenizer name, vocabulary, content hash; the
sources; per-file hashes and counts; per-shard hashes). Everything is written into a temporary folder
that is renamed into place when complete, so a half-written corpus is never read.

Tokenizing runs in `workers` processes, each decoding and encoding whole batches; the main process
reads the sources and writes the shards in order, with a bounded number of batches in flight.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from moeyard.errors import DataError
from moeyard.trainer.data.sources import (
    BATCH_BYTES,
    RecordBatch,
    Source,
    decode_batch,
    file_sha256,
    open_source,
    read_batches,
)
from moeyard.trainer.data.tokenizer import ByteTokenizer, HFTokenizer, copy_tokenizer_files, load_tokenizer

FORMAT = "moeyard-tokens-v2"
SHARD_TOKENS = 1 << 26  # 64 Mi tokens per shard file
UINT16_VOCAB = 1 << 16


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: Optional[Path] = None
    """A Hugging Face tokenizer folder; None: the byte tokenizer."""
    text_field: str = "text"
    glob: str = "*.py"
    workers: int = 1
    skip_malformed: bool = False
    progress: bool = False


@dataclass
class Encoded:
    """One batch, tokenized: documents' tokens back to back and their lengths."""

    file: Path
    tokens: np.ndarray
    lengths: np.ndarray
    errors: list[str]
    nbytes: int
    record: int


_TOKENIZER: ByteTokenizer | HFTokenizer | None = None  # one per worker process


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the thread that started it ends (a SIGKILLed `moeyard
    prepare` would otherwise leave its workers blocked on their queue for ever). ProcessPoolExecutor starts
    its workers from the thread that submits (prepare's main thread); started from a thread that ends
    sooner, they would die with it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        return
    if os.getppid() != parent:  # the parent died before the call (re-parented, to init or a subreaper)
        os._exit(1)


def _init_worker(folder: Optional[Path], parent: int) -> None:
    global _TOKENIZER
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N processes already: no thread pool in each
    _TOKENIZER = load_tokenizer(folder)


def _encode(batch: RecordBatch, text_field: str, tokenizer: ByteTokenizer | HFTokenizer) -> Encoded:
    texts, errors = decode_batch(batch, text_field, as_bytes=isinstance(tokenizer, ByteTokenizer))
    docs = tokenizer.encode_documents(texts) if texts else []
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs) if docs else np.empty(0, dtype=np.uint32)
    return Encoded(batch.file, tokens, lengths, errors, batch.nbytes, batch.record)


def _encode_in_worker(batch: RecordBatch, text_field: str) -> Encoded:
    return _encode(batch, text_field, _TOKENIZER)


def _encoded(batches: Iterator[RecordBatch], opts: PrepareOptions,
             tokenizer: ByteTokenizer | HFTokenizer) -> Iterator[Encoded]:
    """Each batch tokenized, in order: in this process, or in `opts.workers` processes with at most two
    batches per worker in flight (memory stays bounded however large the sources are)."""
    if opts.workers <= 1:
        for batch in batches:
            yield _encode(batch, opts.text_field, tokenizer)
        return
    with ProcessPoolExecutor(opts.workers, initializer=_init_worker,
                             initargs=(opts.tokenizer, os.getpid())) as pool:
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_in_worker, batch, opts.text_field))
                if len(pending) >= 2 * opts.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise DataError(f"a tokenizer worker died (killed, most often by the out-of-memory killer: each of the "
                            f"{opts.workers} workers holds a batch of ~{BATCH_BYTES >> 20} MiB of text and its "
                            f"tokens): run with fewer --workers") from None


class ShardWriter:
    """Appends documents to shard files, starting a new shard between documents past SHARD_TOKENS."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._digest = hashlib.sha256()
        self._tokens = 0
        self._starts: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        if self._file is None:
            name = f"tokens_{len(self.shards):05d}.bin"
            self._file = open(self.folder / name, "wb")
        data = tokens.astype(self.dtype).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self._starts.append(self._tokens + np.concatenate([[0], np.cumsum(lengths[:-1])]))
        self._tokens += int(lengths.sum())
        if self._tokens >= SHARD_TOKENS:
            self.close_shard()

    def close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        index = f"docs_{len(self.shards):05d}.bin"
        starts = np.concatenate(self._starts).astype(np.int64)
        starts.tofile(self.folder / index)
        self.shards.append({"file": Path(self._file.name).name, "index": index, "tokens": self._tokens,
                            "documents": len(starts), "sha256": self._digest.hexdigest(),
                            "index_sha256": hashlib.sha256(starts.tobytes()).hexdigest()})
        self._file, self._digest, self._tokens, self._starts = None, hashlib.sha256(), 0, []


class Progress:
    """Documents/s, MB/s and tokens while preparing (tqdm on stderr when asked), and the final summary."""

    def __init__(self, total_bytes: int, show: bool) -> None:
        self.start = time.perf_counter()
        self.documents = self.tokens = self.skipped = self.nbytes = 0
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare")

    def update(self, enc: Encoded) -> None:
        self.documents += len(enc.lengths)
        self.tokens += int(enc.lengths.sum())
        self.nbytes += enc.nbytes
        if self.bar is not None:
            seconds = max(1e-9, time.perf_counter() - self.start)
            self.bar.update(enc.nbytes)
            self.bar.set_postfix_str(f"{self.documents / seconds:,.0f} docs/s, {self.tokens:,} tokens", refresh=False)

    def close(self) -> None:
        """End the bar's line (an error printed next starts on its own)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> dict[str, Any]:
        self.close()
        seconds = time.perf_counter() - self.start
        return {"documents": self.documents, "tokens": self.tokens, "skipped": self.skipped,
                "text_bytes": self.nbytes, "seconds": round(seconds, 3),
                "tokens_per_s": round(self.tokens / max(seconds, 1e-9))}


def _all_batches(sources: list[Source], text_field: str, files: list[dict[str, Any]]) -> Iterator[RecordBatch]:
    """Every source's batches in order; records each file (path, size, hash) in `files` as it is reached."""
    for source in sources:
        for path in source.files:
            files.append({"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                          "documents": 0, "tokens": 0, "skipped": 0})
            for batch in read_batches(source, path, text_field):
                batch.record = len(files) - 1
                yield batch


def _write_tokens(sources: list[Source], opts: PrepareOptions, tokenizer, tmp: Path,
                  on_skip: Callable[[str], None]) -> tuple[ShardWriter, list[dict], Progress]:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= UINT16_VOCAB else np.uint32)
    writer = ShardWriter(tmp, dtype)
    files: list[dict[str, Any]] = []
    progress = Progress(sum(f.stat().st_size for s in sources for f in s.files), opts.progress)
    try:
        for enc in _encoded(_all_batches(sources, opts.text_field, files), opts, tokenizer):
            _write(enc, opts, tokenizer, writer, files, progress, on_skip)
    except BaseException:
        progress.close()
        raise
    writer.close_shard()
    return writer, files, progress


def _write(enc: Encoded, opts: PrepareOptions, tokenizer, writer: ShardWriter, files: list[dict[str, Any]],
           progress: Progress, on_skip: Callable[[str], None]) -> None:
    """One tokenized batch into the shards and the per-file counts."""
    if enc.errors:
        if not opts.skip_malformed:
            raise DataError(f"{enc.errors[0]}: fix the record, or pass --skip-malformed to skip and count "
                            f"such records")
        for error in enc.errors:
            on_skip(error)
    if len(enc.tokens) and int(enc.tokens.max()) >= tokenizer.vocab_size:
        raise DataError(f"{enc.file}: the tokenizer produced id {int(enc.tokens.max())}, beyond its "
                        f"vocabulary of {tokenizer.vocab_size}")
    writer.add(enc.tokens, enc.lengths)
    record = files[enc.record]
    record["documents"] += len(enc.lengths)
    record["tokens"] += int(enc.lengths.sum())
    record["skipped"] += len(enc.errors)
    progress.skipped += len(enc.errors)
    progress.update(enc)


def prepare_corpus(paths: list[Path], out: Path, opts: PrepareOptions = PrepareOptions(),
                   fingerprint: str = "") -> dict[str, Any]:
    """Tokenize `paths` (folders, JSONL, Parquet, save_to_disk datasets) into the corpus folder `out`."""
    sources = [open_source(Path(p), opts.glob) for p in paths]  # every source checked before any work
    twice = sorted(str(f) for f, n in Counter(f.resolve() for s in sources for f in s.files).items() if n > 1)
    if twice:
        raise DataError(f"{twice[:3]} would be read twice (the same file, or folders that overlap): give each "
                        f"source once")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a folder to create")
    if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a prepared corpus: remove it or choose another folder")
    tokenizer = load_tokenizer(opts.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lock = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would lock other users out of a shared corpus
    skipped_examples: list[str] = []
    try:
        writer, files, progress = _write_tokens(
            sources, opts, tokenizer, tmp, lambda e: len(skipped_examples) < 20 and skipped_examples.append(e))
        if not writer.shards:
            raise DataError(f"the sources {[str(p) for p in paths]} hold no documents"
                            + (f" ({progress.skipped} malformed records skipped)" if progress.skipped else ""))
        record = tokenizer.record()
        if isinstance(tokenizer, HFTokenizer):
            copy_tokenizer_files(tokenizer.folder, tmp / "tokenizer")
            record["dir"] = "tokenizer"
        summary = progress.summary()
        meta = {"format": FORMAT, "tokenizer": record, "vocab_size": tokenizer.vocab_size,
                "dtype": writer.dtype.name, "sources": [{"path": str(s.path.resolve()), "kind": s.kind} for s in sources],
                "text_field": opts.text_field, "glob": opts.glob, "source_fingerprint": fingerprint,
                "documents": summary["documents"], "tokens": summary["tokens"], "skipped": summary["skipped"],
                "skipped_examples": skipped_examples, "files": files, "shards": writer.shards,
                "content_hash": hashlib.sha256("".join(s["sha256"] for s in writer.shards).encode()).hexdigest()[:16],
                "prepare": {"workers": opts.workers, "seconds": summary["seconds"],
                            "tokens_per_s": summary["tokens_per_s"], "text_bytes": summary["text_bytes"]}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / LOCK).unlink()  # the lock stays held through the rename: a cleaner sees no lock file
        move_into_place(tmp, out)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _cache_fingerprint(corpus: Path) -> str:
    """The source fingerprint of moeyard's own cache of a data.source (prepare_folder); "" for a corpus a user
    made with `moeyard prepare` (or an unreadable meta.json): that one is theirs, never replaced."""
    try:
        meta = json.loads((corpus / "meta.json").read_text())
    except (OSError, ValueError):
        return ""
    return meta.get("source_fingerprint") or "" if isinstance(meta, dict) else ""


LOCK = ".writing"
"""A file in a prepare's temporary folder, locked (flock) while it writes there."""


def _remove_abandoned(out: Path) -> None:
    """Remove the temporary folders a killed prepare into `out` left behind: those whose writer's lock can be
    taken (its process is gone, whatever machine or container it ran in); a live writer holds its lock."""
    for leftover in out.parent.glob(f"{glob_escape(f'.{out.name}.tmp-')}*"):
        try:
            fd = os.open(leftover / LOCK, os.O_RDWR)
        except OSError:  # no lock file: not a folder this moeyard writes, or one being finished
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live prepare
            continue
        else:
            shutil.rmtree(leftover, ignore_errors=True)
        finally:
            os.close(fd)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished corpus `tmp` to `out`. Only moeyard's cache of a data.source (a non-empty source
    fingerprint) replaces a corpus there, and only its own older cache (moved aside first: runs reading it
    keep their files); where another process finished the same cache first, theirs is kept. A corpus a user
    asked for that finds `out` filled meanwhile is discarded with an error: nobody's corpus is swapped."""
    new = _cache_fingerprint(tmp)
    taken = f"another process wrote a corpus to {out} while this one ran; this run's corpus was discarded " \
            f"and {out} holds the other's: choose another --out"
    try:
        if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
            raise DataError(f"{out} exists and is not a prepared corpus: remove it or choose another folder")
        if (out / "meta.json").is_file():
            old = _cache_fingerprint(out)
            if not (new and old):
                raise DataError(taken)
            if old != new or json.loads((out / "meta.json").read_text()).get("format") != FORMAT:
                aside = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, aside)
                shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, out)  # atomic; also replaces an empty folder
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # not a race: permissions, another disk, ...
                raise DataError(f"cannot move the corpus into {out}: {err.strerror}") from None
            if not (new and _cache_fingerprint(out) == new):
                raise DataError(taken) from None
            shutil.rmtree(tmp)  # another process (or node sharing the cache) finished the same cache first
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
