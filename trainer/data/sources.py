"""Where pretraining text comes from: folders of text files, JSONL (optionally gzipped), Parquet, and
datasets written by `datasets`' save_to_disk (Arrow IPC streams).

Every source is read as a stream of small record batches (pyarrow's batch readers, line by line for
JSONL), never whole in memory. Batches are decoded where they are tokenized (`decode_batch`), so worker
processes share the JSON parsing; a malformed record becomes an error string `file:line: reason`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal

from moeyard.errors import DataError
from moeyard.trainer.checkpoint.store import is_plain_name

BATCH_BYTES = 1 << 22  # about 4 MiB of text per batch handed to a tokenizer
BATCH_ROWS = 2048
SKIPPED_PARTS = {"site-packages", "dist-packages", "__pycache__"}

Kind = Literal["folder", "jsonl", "parquet", "arrow"]


@dataclass(frozen=True)
class Source:
    path: Path
    kind: Kind
    files: tuple[Path, ...]
    """What is read, in order (one file is one document in a folder source)."""


@dataclass
class RecordBatch:
    """Records of one file. `payloads`: whole files' bytes (folder), JSONL lines' bytes, or table cells."""

    file: Path
    form: Literal["file", "jsonl", "cell"]
    locations: list[int]
    """Line (JSONL) or row (tables) number of each record, from 1; 0 for whole files."""
    payloads: list = field(default_factory=list)
    nbytes: int = 0
    record: int = -1
    """Which of the corpus's per-file records it counts towards (set by the corpus writer)."""


def folder_files(src: Path, glob: str) -> Iterator[Path]:
    """The regular files under `src` that `src.rglob(glob)` matches, sorted as paths; skips installed
    third-party packages and caches. The skipped folders are never entered: the stdlib's site-packages (torch
    and the rest) held 40x the stdlib's own entries, and every launcher and worker lists this folder to
    fingerprint the default corpus."""
    if not glob or glob.startswith("/") or glob.endswith("/"):
        raise DataError(f"data.glob={glob!r}: give a pattern of file names relative to the folder, e.g. '*.txt' or "
                        f"'docs/*.md' (not empty, absolute or ending in '/')")
    if "**" in glob:  # a recursive pattern of its own: pathlib's walk, filtered after
        found = (p for p in src.rglob(glob) if not SKIPPED_PARTS.intersection(p.relative_to(src).parts))
    else:
        found = _walk_matching(src, glob)
    yield from sorted(p for p in found if p.is_file() and not p.is_symlink())


def _walk_matching(src: Path, glob: str) -> Iterator[Path]:
    """What rglob(glob) yields for a pattern without "**" (matched against the path's last components),
    without entering SKIPPED_PARTS folders or following links to folders, as rglob does not."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in SKIPPED_PARTS]
        rel = PurePosixPath(Path(root).relative_to(src))
        for name in files:
            if name not in SKIPPED_PARTS and (rel / name).match(glob):
                yield Path(root, name)


def _arrow_files(folder: Path) -> tuple[Path, ...]:
    try:
        names = [f["filename"] for f in json.loads((folder / "state.json").read_text()).get("_data_files", [])]
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DataError(f"{folder / 'state.json'} is not a datasets state file ({err!r}): save the dataset again "
                        f"with save_to_disk") from None
    outside = [str(n) for n in names if not is_plain_name(n) or (folder / n).is_symlink()]
    if outside:
        raise DataError(f"{folder / 'state.json'} lists data files {outside[:3]} outside {folder}: each must be a "
                        f"file name inside the dataset's folder (the file was edited or belongs elsewhere)")
    files = tuple(folder / n for n in names)
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{folder}: the dataset's state.json lists data files that are not there ({missing[:3]}): "
                        f"save it again with save_to_disk")
    return files


def open_source(path: Path, glob: str) -> Source:
    """What `path` is, checked before anything is tokenized."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
            raise DataError(f"{path} is a DatasetDict with splits {splits}: give one split's folder, e.g. "
                            f"{path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return Source(path, "arrow", _arrow_files(path))
        files = tuple(folder_files(path, glob))
        if not files:
            raise DataError(f"no files matching {glob!r} under {path}: check the folder and --glob")
        records = [str(f) for f in files if f.name.lower().endswith(NOT_TEXT_SUFFIXES)]
        if records:
            raise DataError(f"{records[:3]} match {glob!r} under {path}, but a folder source reads each file as "
                            f"raw text: give record files (.jsonl, .jsonl.gz, .parquet) as sources of their own, "
                            f"and choose a --glob that matches text files only")
        return Source(path, "folder", files)
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"data source {path} does not exist: give a folder of text files, a .jsonl, .jsonl.gz "
                        f"or .parquet file, or a folder written by datasets' save_to_disk")
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return Source(path, "jsonl", (path,))
    if name.endswith(".parquet"):
        return Source(path, "parquet", (path,))
    raise DataError(f"data source {path}: unknown kind of file (expected .jsonl, .jsonl.gz or .parquet, a folder "
                    f"of text files, or a folder written by datasets' save_to_disk)")


NOT_TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".parquet", ".arrow", ".gz", ".bz2", ".xz",
                     ".zst", ".zip", ".tar", ".bin", ".npy", ".safetensors", ".pt")
"""Files a folder source refuses to read as raw text: records, archives, tensors, token shards."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def read_batches(source: Source, file: Path, text_field: str) -> Iterator[RecordBatch]:
    """The records of one of the source's files, in batches of about BATCH_BYTES."""
    if source.kind == "folder":
        yield _whole_file(file)
    elif source.kind == "jsonl":
        yield from _jsonl_batches(file)
    else:
        yield from _table_batches(file, source.kind, text_field)


def _whole_file(file: Path) -> RecordBatch:
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DataError(f"{file}: cannot be read ({err.strerror})") from None
    return RecordBatch(file, "file", [0], [data], len(data))


def _jsonl_batches(file: Path) -> Iterator[RecordBatch]:
    batch = RecordBatch(file, "jsonl", [])
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                batch.locations.append(number)
                batch.payloads.append(line)
                batch.nbytes += len(line)
                if batch.nbytes >= BATCH_BYTES:
                    yield batch
                    batch = RecordBatch(file, "jsonl", [])
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{file}: damaged or truncated file ({err}): the records before it are not kept") from None
    if batch.payloads:
        yield batch


def _table_batches(file: Path, kind: Kind, text_field: str) -> Iterator[RecordBatch]:
    """Parquet row groups or Arrow IPC stream batches, one column at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading {kind} needs pyarrow: pip install 'moeyard[data]'") from None
    try:
        if kind == "parquet":
            reader = pq.ParquetFile(file)
            schema = reader.schema_arrow
            stream = reader.iter_batches(batch_size=BATCH_ROWS, columns=[text_field]) \
                if text_field in schema.names else iter(())
        else:
            stream = pa.ipc.open_stream(pa.memory_map(str(file)))
            schema = stream.schema
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: not a readable {kind} file ({err})") from None
    if text_field not in schema.names:
        raise DataError(f"{file} has no column {text_field!r} (columns: {', '.join(schema.names)}): choose one "
                        f"with --field")
    if not _is_text(pa, schema.field(text_field).type):
        raise DataError(f"{file}: column {text_field!r} holds {schema.field(text_field).type}, not text: choose a "
                        f"text column with --field")
    row = 1
    try:
        for record_batch in stream:
            cells = record_batch.column(text_field).to_pylist()
            # About BATCH_BYTES of text per batch, whatever the rows hold: a tokenizer's memory follows the
            # text it is handed (~165x for an HF one), and 2,048 long documents would be gigabytes.
            start, nbytes = 0, 0
            for i, cell in enumerate(cells):
                nbytes += len(cell) if isinstance(cell, str) else 0
                if nbytes >= BATCH_BYTES or i == len(cells) - 1:
                    yield RecordBatch(file, "cell", list(range(row + start, row + i + 1)), cells[start:i + 1], nbytes)
                    start, nbytes = i + 1, 0
            row += len(cells)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file}: damaged at row {row} ({err}): the records before it are not kept") from None


def _is_text(pa, kind) -> bool:
    """A string column, however Arrow stores it (plain, large, view, or dictionary-encoded)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)


def _utf8_error(err: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 at byte {err.start}"


def _json_text(line: bytes, text_field: str) -> str:
    """The text field of one JSONL line; ValueError(reason) if it has none."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(_utf8_error(err)) from None
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"no {text_field!r} field (keys: {', '.join(list(record)[:8])}); choose one with --field")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{text_field!r} is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate escape such as "\ud800"
        raise ValueError(f"{text_field!r} holds a lone surrogate at character {err.start}, not valid text") from None
    return text


def decode_batch(batch: RecordBatch, text_field: str, as_bytes: bool) -> tuple[list, list[str]]:
    """(documents, errors): each good record's text (UTF-8 bytes when `as_bytes`, for the byte tokenizer,
    else str), and `file:line: reason` for each malformed one, in order."""
    texts: list = []
    errors: list[str] = []
    for where, payload in zip(batch.locations, batch.payloads):
        try:
            if batch.form == "file":
                if b"\0" in payload:  # no text holds a NUL byte; binaries and token shards do
                    raise ValueError("not text (it holds NUL bytes): choose a --glob that matches text files only")
                text = payload if as_bytes else _decode_strict(payload)
            elif batch.form == "jsonl":
                text = _json_text(payload, text_field)
            elif payload is None:
                raise ValueError(f"{text_field!r} is null")
            else:
                text = payload
        except ValueError as err:
            place = f"{batch.file}" if batch.form == "file" else \
                f"{batch.file}:{where}" if batch.form == "jsonl" else f"{batch.file}:row {where}"
            errors.append(f"{place}: {err}")
            continue
        texts.append(text.encode("utf-8") if as_bytes and isinstance(text, str) else text)
    return texts, errors


def _decode_strict(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(_utf8_error(err)) from None
