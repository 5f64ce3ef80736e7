"""Token shards and per-rank batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeyard.errors import DataError
from moeyard.trainer.data.blend import TokenBatches
from moeyard.trainer.data.tokenizer import ByteTokenizer
from moeyard.trainer.data.tokens import prepare_folder as prepare_corpus
from moeyard.trainer.data.tokens import read_meta


def test_prepare_is_byte_exact(tmp_path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.py").write_text("print('é')\n")
    (src / "sub" / "b.py").write_text("x = 1\n")
    (src / "notes.txt").write_text("ignored")
    meta = prepare_corpus(src, tmp_path / "out", "*.py")
    assert meta["documents"] == 2
    tokens = np.fromfile(tmp_path / "out" / meta["shards"][0]["file"], dtype=np.uint16).tolist()
    eos = ByteTokenizer.eos_id
    assert tokens == list("print('é')\n".encode()) + [eos] + list(b"x = 1\n") + [eos]
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary folder left behind"


def test_empty_source_and_truncated_shard_are_reported(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files matching"):
        prepare_corpus(tmp_path / "empty", tmp_path / "out", "*.py")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="is not a directory"):
        prepare_corpus(tmp_path / "missing", tmp_path / "out2", "*.py")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("a" * 100)
    meta = prepare_corpus(src, tmp_path / "ok", "*.py")
    shard = tmp_path / "ok" / meta["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_meta(tmp_path / "ok")
    with pytest.raises(DataError, match="no meta.json"):
        read_meta(tmp_path)


def test_ranks_split_the_global_batch_without_overlap(small_corpus) -> None:
    single = TokenBatches(small_corpus, 32, 8, dp_rank=0, dp_size=1, seed=5)
    ranks = [TokenBatches(small_corpus, 32, 8, dp_rank=r, dp_size=4, seed=5) for r in range(4)]
    for step in (0, 1, 7):
        whole = single.batch(step).tokens_BT1
        parts = [b.batch(step).tokens_BT1 for b in ranks]
        assert all(p.shape == (2, 33) for p in parts)
        assert torch.equal(torch.cat(parts), whole)
        ids = [i for b in ranks for i in b.window_ids(step)]
        assert ids == single.window_ids(step) and len(set(ids)) == 8, "ranks overlap or a window repeats"
    assert not torch.equal(single.batch(0).tokens_BT1, single.batch(1).tokens_BT1)
    other_seed = TokenBatches(small_corpus, 32, 8, dp_rank=0, dp_size=1, seed=6)
    assert not torch.equal(other_seed.batch(0).tokens_BT1, single.batch(0).tokens_BT1)


def test_epochs_wrap_and_reshuffle(small_corpus) -> None:
    b = TokenBatches(small_corpus, 32, 8, dp_rank=0, dp_size=1, seed=0)
    steps_per_epoch = b.num_windows // 8
    seen = [i for s in range(steps_per_epoch) for i in b.window_ids(s)]
    assert len(set(seen)) == len(seen), "a window repeats within an epoch"
    next_epoch = [i for s in range(steps_per_epoch, 2 * steps_per_epoch) for i in b.window_ids(s)]
    assert next_epoch != seen and len(set(next_epoch)) == len(next_epoch)
    assert b.batch(steps_per_epoch + 1).tokens_BT1.shape == (8, 33)


def test_meta_format_is_checked(small_corpus, tmp_path) -> None:
    meta = json.loads((small_corpus / "meta.json").read_text())
    assert meta["tokenizer"]["name"] == "bytes" and meta["dtype"] == "uint16" and meta["tokens"] > 100_000
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(DataError, match="format"):
        read_meta(tmp_path)


def test_prepare_never_clobbers_a_foreign_folder(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a prepared corpus"):
        prepare_corpus(src, foreign, "*.py")
    assert (foreign / "keep.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_corpus(src, empty, "*.py")
    assert read_meta(empty)["documents"] == 1


def test_a_data_dir_without_corpus_is_only_filled_from_an_explicit_source(tmp_path) -> None:
    from moeyard.trainer.data.tokens import ensure_corpus

    with pytest.raises(DataError, match="holds no prepared corpus"):
        ensure_corpus(None, str(tmp_path / "typo"), "*.py")
    assert not (tmp_path / "typo").exists()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    assert ensure_corpus(str(src), str(tmp_path / "new"), "*.py") == tmp_path / "new"


def test_a_cached_corpus_is_prepared_again_when_its_source_files_change(tmp_path, monkeypatch) -> None:
    from moeyard.trainer.data.tokens import ensure_corpus

    monkeypatch.setenv("MOEYARD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("tiny\n")
    first = ensure_corpus(str(src), None, "*.txt")
    assert read_meta(first)["tokens"] == 6
    (src / "b.txt").write_text("x" * 4000)  # a file added
    again = ensure_corpus(str(src), None, "*.txt")
    assert again == first and read_meta(again)["tokens"] == 6 + 4001
    (src / "a.txt").write_text("changed!\n")  # a file edited
    assert read_meta(ensure_corpus(str(src), None, "*.txt"))["tokens"] == 10 + 4001
    assert sorted(p.name for p in again.parent.iterdir()) == [again.name], "an old copy was left behind"


def test_a_corpus_smaller_than_one_global_batch_is_refused_from_its_meta(tmp_path) -> None:
    from moeyard.trainer.data.tokens import check_corpus_size

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("y" * 1000)
    meta = prepare_corpus(src, tmp_path / "out", "*.txt")
    check_corpus_size(tmp_path / "out", meta, seq_len=100, global_batch=10)  # 1000 tokens: 10 sequences
    with pytest.raises(DataError, match="has 10 sequences of 100 tokens, fewer than one global batch \\(11\\)"):
        check_corpus_size(tmp_path / "out", meta, seq_len=100, global_batch=11)


def test_a_corpus_made_with_moeyard_prepare_is_never_prepared_again_from_data_source(tmp_path) -> None:
    """Issue 35 item 1: data.dir (made by `moeyard prepare --tokenizer`) beside data.source (the folder it came
    from) used to be deleted and re-tokenized with the byte tokenizer. A corpus a user made is theirs: used as
    it is, whatever data.source says; only moeyard's own cache of a data.source is refreshed."""
    from helpers.tokenizer_cases import train_bpe

    from moeyard.trainer.data.corpus import PrepareOptions
    from moeyard.trainer.data.corpus import prepare_corpus as prepare_sources
    from moeyard.trainer.data.tokens import ensure_corpus

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    tok = train_bpe(tmp_path / "tok", [(src / "a.py").read_text()])
    corpus = tmp_path / "corp"
    prepare_sources([src], corpus, PrepareOptions(tokenizer=tok, glob="*.py"))
    before = (corpus / "meta.json").read_bytes()
    (src / "b.py").write_text("y = 2\n")  # the source moves on: still not a reason to touch the user's corpus
    assert ensure_corpus(str(src), str(corpus), "*.py") == corpus
    assert (corpus / "meta.json").read_bytes() == before
    assert (corpus / "tokenizer" / "tokenizer.json").is_file()


def test_two_prepares_into_one_folder_never_keep_the_other_ones_corpus_silently(tmp_path) -> None:
    """Issue 35 item 3: the process that finishes second used to print success while the folder held the other
    run's corpus. A corpus a user asked for (`moeyard prepare`) that finds the folder taken says so and keeps the
    first; two processes filling moeyard's cache of the same source agree (the second keeps the first's)."""
    from moeyard.trainer.data.corpus import PrepareOptions, move_into_place
    from moeyard.trainer.data.corpus import prepare_corpus as prepare_sources

    for name, text in (("one", "first corpus\n"), ("two", "second, different corpus\n" * 3)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
        prepare_sources([tmp_path / f"{name}.jsonl"], tmp_path / name, PrepareOptions())
    first = (tmp_path / "one" / "meta.json").read_bytes()
    with pytest.raises(DataError, match="another process wrote a corpus"):
        move_into_place(tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "one" / "meta.json").read_bytes() == first
    assert not (tmp_path / "two").exists(), "the losing run's files were left behind"

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    prepare_corpus(src, tmp_path / "cache", "*.py")
    prepare_corpus(src, tmp_path / "racer", "*.py")
    move_into_place(tmp_path / "racer", tmp_path / "cache")  # the same cache, finished twice: fine
    assert read_meta(tmp_path / "cache")["documents"] == 1


def test_damaged_shards_are_named_not_trained_on(small_corpus, tmp_path, capsys) -> None:
    """Issue 35 item 7: an id >= vocab_size gave a 60-line IndexError (a device assert on a GPU), a scrambled
    document index trained silently. Each batch's ids are bounded by the vocabulary and each index is checked
    before its first use; `moeyard prepare --verify` checks every shard against its recorded sha256."""
    import shutil

    from moeyard.launch.cli import main

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    assert main(["prepare", "--verify", str(corpus)]) == 0
    assert "intact" in capsys.readouterr().out
    meta = read_meta(corpus)
    shard = corpus / meta["shards"][0]["file"]
    ids = np.fromfile(shard, dtype=meta["dtype"])
    ids[: len(ids) // 2] = 300  # past the byte vocabulary of 257, in every window of the first half
    ids.tofile(shard)
    with pytest.raises(DataError, match="outside the corpus's vocabulary of 257"):
        TokenBatches(corpus, 32, 8, dp_rank=0, dp_size=1, seed=5).batch(0)
    assert main(["prepare", "--verify", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert "does not match the sha256" in out and "token id 300" in out and "damaged" in out

    shutil.rmtree(corpus)
    shutil.copytree(small_corpus, corpus)
    index = corpus / meta["shards"][0]["index"]
    starts = np.fromfile(index, dtype=np.int64)
    np.random.default_rng(0).shuffle(starts)
    starts.tofile(index)
    with pytest.raises(DataError, match="document starts are not increasing"):
        TokenBatches(corpus, 32, 8, dp_rank=0, dp_size=1, seed=5, document_mask=True).batch(0)
    assert main(["prepare", "--verify", str(corpus)]) == 1
