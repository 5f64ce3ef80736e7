"""`moeyard prepare`: every source format gives the same tokens, large vocabularies, malformed input."""
from __future__ import annotations

import gzip
import json
import re
import shutil

import numpy as np
import pytest

from moeyard.errors import DataError
from moeyard.trainer.data.corpus import PrepareOptions, prepare_corpus
from moeyard.trainer.data.sources import folder_files
from moeyard.trainer.data.tokenizer import tokenizer_record
from moeyard.trainer.data.tokens import read_meta
from tests.helpers.tokenizer_cases import DOCUMENTS, train_bpe, word_level, write_every_format

pytest.importorskip("pyarrow")
pytest.importorskip("datasets")


def _tokens_and_starts(corpus) -> tuple[list[int], list[int]]:
    meta = read_meta(corpus)
    tokens, starts, offset = [], [], 0
    for shard in meta["shards"]:
        tokens += np.fromfile(corpus / shard["file"], dtype=meta["dtype"]).tolist()
        starts += (np.fromfile(corpus / shard["index"], dtype=np.int64) + offset).tolist()
        offset += shard["tokens"]
    return tokens, starts


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_every_format(tmp_path_factory.mktemp("formats"), DOCUMENTS)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"), DOCUMENTS * 20, bos=True)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_every_format_gives_the_tokens_of_the_same_text_in_a_folder(tmp_path, formats, bpe, tokenizer) -> None:
    from tokenizers import Tokenizer

    opts = PrepareOptions(tokenizer=None if tokenizer == "bytes" else bpe, glob="*.txt")
    reference = None
    for kind, path in formats.items():
        meta = prepare_corpus([path], tmp_path / kind, opts)
        assert meta["documents"] == len(DOCUMENTS) and meta["sources"][0]["kind"] == kind.split(".")[0]
        got = _tokens_and_starts(tmp_path / kind)
        reference = reference or got
        assert got == reference, f"{kind} tokenizes differently from the folder"
    tokens, starts = reference
    if tokenizer == "bpe":  # BOS from the tokenizer's post-processor, EOS appended: as the tokenizer defines them
        hf = Tokenizer.from_file(str(bpe / "tokenizer.json"))
        expect = [hf.encode(d).ids + [hf.token_to_id("<|endoftext|>")] for d in DOCUMENTS]
        assert expect[0][0] == hf.token_to_id("<|bos|>")
        assert (tmp_path / "folder" / "tokenizer" / "tokenizer.json").is_file(), "the corpus keeps its tokenizer"
    else:
        expect = [list(d.encode()) + [256] for d in DOCUMENTS]
    assert tokens == [t for doc in expect for t in doc]
    assert starts == np.cumsum([0] + [len(d) for d in expect[:-1]]).tolist()


def test_workers_give_the_same_corpus_as_one_process(tmp_path, formats, bpe) -> None:
    many = [formats["jsonl"]] * 1 + [formats["parquet"], formats["arrow"]]
    one = prepare_corpus(many, tmp_path / "one", PrepareOptions(tokenizer=bpe))
    two = prepare_corpus(many, tmp_path / "two", PrepareOptions(tokenizer=bpe, workers=2))
    assert one["content_hash"] == two["content_hash"] and one["documents"] == 3 * len(DOCUMENTS)
    assert [f["sha256"] for f in one["files"]] == [f["sha256"] for f in two["files"]]
    assert one["files"][0]["documents"] == len(DOCUMENTS) and one["tokenizer"]["hash"] == tokenizer_record(bpe)["hash"]


def test_a_vocabulary_past_16_bits_gives_uint32_shards(tmp_path) -> None:
    tok = word_level(tmp_path / "tok", 70_000)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w69997 w3 w65534 w65535 w70000"}) + "\n")
    meta = prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions(tokenizer=tok))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    tokens, _ = _tokens_and_starts(tmp_path / "out")
    assert tokens == [69_999, 5, 65_536, 65_537, 0, 1]  # ids past 65,535 survive; w70000 is unknown; EOS
    small = prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "bytes", PrepareOptions())
    assert small["dtype"] == "uint16"


def test_the_tokenizer_hash_ignores_formatting_and_sees_the_vocabulary(tmp_path, bpe) -> None:
    import shutil

    copy = shutil.copytree(bpe, tmp_path / "copy")
    data = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=4, sort_keys=True))
    assert tokenizer_record(copy)["hash"] == tokenizer_record(bpe)["hash"]
    data["model"]["vocab"]["zzz-new"] = len(data["model"]["vocab"]) + 10
    (copy / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_record(copy)["hash"] != tokenizer_record(bpe)["hash"]


def _jsonl(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "ok"', "not JSON"),
    (b'["text"]', "not a JSON object but list"),
    (b'{"body": "x"}', "no 'text' field (keys: body)"),
    (b'{"text": 3}', "'text' is int, not a string"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
    (b'{"text": "\\ud800"}', "'text' holds a lone surrogate at character 0"),
])
def test_a_malformed_jsonl_line_is_named_or_skipped_and_counted(tmp_path, line, reason) -> None:
    _jsonl(tmp_path / "d.jsonl", [b'{"text": "good"}', b"", line, b'{"text": "fine"}'])
    with pytest.raises(DataError, match=f"d.jsonl:3: {re.escape(reason)}.*--skip-malformed") as err:
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions())
    assert str(tmp_path / "d.jsonl") in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*")), "a partial corpus was left"
    meta = prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions(skip_malformed=True))
    assert (meta["documents"], meta["skipped"], meta["files"][0]["skipped"]) == (2, 1, 1)
    assert meta["skipped_examples"][0].startswith(f"{tmp_path / 'd.jsonl'}:3: {reason}")
    assert _tokens_and_starts(tmp_path / "out")[0] == list(b"good") + [256] + list(b"fine") + [256]


def test_invalid_utf8_in_a_text_file_is_named_for_a_real_tokenizer_and_kept_as_bytes_otherwise(tmp_path, bpe) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"ok \xff\xfe here")
    with pytest.raises(DataError, match=r"a.txt: invalid UTF-8 at byte 3"):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", PrepareOptions(tokenizer=bpe, glob="*.txt"))
    meta = prepare_corpus([tmp_path / "src"], tmp_path / "bytes", PrepareOptions(glob="*.txt"))
    assert meta["tokens"] == 11  # the byte tokenizer takes any bytes


def test_damaged_and_unreadable_sources_are_named(tmp_path, formats) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = gzip.compress(b'{"text": "a"}\n' * 10_000)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz: damaged or truncated"):
        prepare_corpus([tmp_path / "cut.jsonl.gz"], tmp_path / "o1", PrepareOptions())
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls.parquet:row 2: 'text' is null"):
        prepare_corpus([tmp_path / "nulls.parquet"], tmp_path / "o2", PrepareOptions())
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: id, text\)"):
        prepare_corpus([formats["parquet"]], tmp_path / "o3", PrepareOptions(text_field="body"))
    with pytest.raises(DataError, match="column 'id' holds int64, not text"):
        prepare_corpus([formats["arrow"].parent / "docs.parquet"], tmp_path / "o4", PrepareOptions(text_field="id"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown kind of file"):
        prepare_corpus([formats["jsonl"], tmp_path / "x.csv"], tmp_path / "o5", PrepareOptions())
    assert not (tmp_path / "o5").exists(), "a bad second source must stop before the first is tokenized"


def test_a_dataset_dict_asks_for_one_split(tmp_path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['test', 'train'\]: give one split's folder"):
        prepare_corpus([tmp_path / "dd"], tmp_path / "out", PrepareOptions())
    meta = prepare_corpus([tmp_path / "dd" / "train"], tmp_path / "out", PrepareOptions())
    assert meta["tokens"] == 2


def test_a_saved_truncation_does_not_cut_documents_and_bad_outputs_fail_before_work(tmp_path, bpe) -> None:
    import shutil

    from tokenizers import Tokenizer

    cut = shutil.copytree(bpe, tmp_path / "cut")
    backend = Tokenizer.from_file(str(cut / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.save(str(cut / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": DOCUMENTS[0] * 3}) + "\n")
    full = prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "full", PrepareOptions(tokenizer=bpe))
    assert prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "o", PrepareOptions(tokenizer=cut))["tokens"] == \
        full["tokens"] > 10
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="is not a prepared corpus"):
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "busy", PrepareOptions())
    with pytest.raises(DataError, match="would be read twice"):
        prepare_corpus([tmp_path / "d.jsonl", tmp_path / "." / "d.jsonl"], tmp_path / "o2", PrepareOptions())


@pytest.mark.parametrize("filename", ["../outside.arrow", "ABSOLUTE"])
def test_a_save_to_disk_state_never_names_a_file_outside_its_folder(tmp_path, filename) -> None:
    """Issue 35 item 9: state.json's data files used to be followed wherever they pointed."""
    formats = write_every_format(tmp_path / "f", DOCUMENTS)
    folder = formats["arrow"]
    state = json.loads((folder / "state.json").read_text())
    outside = tmp_path / "outside.arrow"
    shutil.copy(folder / state["_data_files"][0]["filename"], outside)
    state["_data_files"] = [{"filename": str(outside) if filename == "ABSOLUTE" else filename}]
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match="outside"):
        prepare_corpus([folder], tmp_path / "out", PrepareOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("glob", ["*.py", "*", "pkg/*.py", "*/*.py", "**/*.py", "[!t]*.py"])
def test_a_folder_lists_what_rglob_matches_without_entering_skipped_folders(tmp_path, glob) -> None:
    """folder_files walks the folder itself (pathlib's rglob entered the stdlib's site-packages to filter it out
    after: 1.3 s of every launch): the same files in the same order, hidden ones included, links and the
    skipped folders' contents left out -- and a linked folder never entered (rglob entered one for a pattern
    with a "/" in it, and not for one without)."""
    src = tmp_path / "src"
    for rel in ("a.py", "a/b.py", "a.py.txt", ".hidden.py", "pkg/m.py", "pkg/deep/pkg/n.py", "t.py", "A/C.PY",
                "site-packages/torch/x.py", "x/__pycache__/y.py", "x/dist-packages/z.py", "x/y.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("text\n")
    (src / "folder.py").mkdir()
    (src / "link.py").symlink_to(src / "a.py")
    (src / "linked_dir").symlink_to(src / "pkg")
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    expected = [p for p in sorted(src.rglob(glob)) if p.is_file() and not p.is_symlink()
                and not skipped.intersection(p.relative_to(src).parts) and (src / "linked_dir") not in p.parents]
    found = list(folder_files(src, glob))
    assert found == expected and found, (found, expected)


@pytest.mark.parametrize("glob", ["", "/etc/*.conf", "docs/"])
def test_a_glob_that_names_no_relative_files_is_refused(tmp_path, glob) -> None:
    with pytest.raises(DataError, match="give a pattern of file names relative to the folder"):
        list(folder_files(tmp_path, glob))


@pytest.mark.parametrize("name,data", [("docs.jsonl.gz", None), ("tokens_00000.bin", b"\x01\x00\x02\x00"),
                                        ("blob.txt", b"text\x00\x01binary")])
def test_a_folder_source_reads_only_text(tmp_path, name, data) -> None:
    """Issue 35 item 4: `--glob '*.jsonl*'` put gzip bytes into the corpus; token shards and binaries were read
    as raw text. Record files are named as such before any work, binaries (NUL bytes) as not text."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine\n")
    if data is None:
        with gzip.open(src / name, "wt") as f:
            f.write(json.dumps({"text": "x"}) + "\n")
    else:
        (src / name).write_bytes(data)
    with pytest.raises(DataError, match=r"raw text|not text \(it holds NUL bytes\)"):
        prepare_corpus([src], tmp_path / "out", PrepareOptions(glob="*"))
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_an_eos_token_is_refused_before_work(tmp_path, bpe) -> None:
    """Issue 35 item 5: a folder from Tokenizer.save() (no tokenizer_config.json) gave documents with nothing
    between them (eos_id null), without a word."""
    from tokenizers import Tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    Tokenizer.from_file(str(bpe / "tokenizer.json")).save(str(bare / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    with pytest.raises(DataError, match="names no eos_token"):
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions(tokenizer=bare))
    assert not (tmp_path / "out").exists()


def test_parquet_text_is_handed_to_the_tokenizer_by_bytes_and_any_string_encoding_reads(tmp_path) -> None:
    """Issue 35 item 11 and a rough edge: 2,048 rows went to the tokenizer at once whatever their size (50 KB
    documents: 4.4 GB a process); dictionary-encoded text was refused as "not text"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeyard.trainer.data.sources import BATCH_BYTES, open_source, read_batches

    docs = [("x" * (BATCH_BYTES // 2 + 1)) + str(i) for i in range(6)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "long.parquet")  # one row group
    source = open_source(tmp_path / "long.parquet", "*")
    batches = list(read_batches(source, tmp_path / "long.parquet", "text"))
    assert [c for b in batches for c in b.payloads] == docs
    assert len(batches) == 3 and all(b.nbytes <= 2 * (BATCH_BYTES // 2 + 2) for b in batches)
    assert [b.locations for b in batches] == [[1, 2], [3, 4], [5, 6]]
    pq.write_table(pa.table({"text": pa.array(DOCUMENTS).dictionary_encode()}), tmp_path / "dict.parquet")
    meta = prepare_corpus([tmp_path / "dict.parquet"], tmp_path / "out", PrepareOptions())
    assert meta["documents"] == len(DOCUMENTS)


def test_prepare_names_an_out_that_is_a_file_and_writes_a_corpus_others_can_read(tmp_path) -> None:
    """Issue 35 rough edges: `--out` naming a file gave a traceback; corpora were created drwx------."""
    import os
    import stat

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "a_file", PrepareOptions())
    old = os.umask(0o022)
    try:
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_a_killed_prepares_temporary_folder_is_removed_by_the_next(tmp_path) -> None:
    """Issue 35 rough edge: `.OUT.tmp-*` left by a killed prepare was never cleaned. A folder whose writer's lock
    can be taken (its process is gone) is removed; one whose writer holds it (alive) is kept."""
    import fcntl
    import os

    from moeyard.trainer.data.corpus import LOCK

    dead, alive = tmp_path / ".out.tmp-abc", tmp_path / ".out.tmp-def"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / LOCK).write_text("")
        (folder / "tokens_00000.bin").write_bytes(b"\0" * 8)
    held = os.open(alive / LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
        prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "out", PrepareOptions())
    finally:
        os.close(held)
    assert not dead.exists() and alive.exists()
    assert not (tmp_path / "out" / LOCK).exists()
