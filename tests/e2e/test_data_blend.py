"""Pretraining on prepared corpora as a user does it: `moeyard prepare` with a Hugging Face tokenizer, a
weighted blend with document masks, resumed at another world size; mismatched tokenizers refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.runs import read_metrics, run_moeyard_train, train_forked, write_config

from moeyard.trainer.data.tokens import stdlib_dir
from tests.helpers.tokenizer_cases import train_bpe, word_level

pytest.importorskip("pyarrow")


def prepare(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "moeyard", "prepare", *args], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    """Two corpora of one BPE tokenizer: the json package's files as JSONL, the email package's as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("blend")
    code = [p.read_text() for p in sorted((stdlib_dir() / "json").glob("*.py"))]
    mail = [p.read_text() for p in sorted((stdlib_dir() / "email").glob("*.py"))]
    tok = train_bpe(root / "tok", code + mail, vocab_size=400, bos=True)
    (root / "code.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in code))
    pq.write_table(pa.table({"content": mail}), root / "mail.parquet")
    out = prepare(str(root / "code.jsonl"), "--out", str(root / "code"), "--tokenizer", str(tok), "--field", "content")
    assert "tokens/s" in out.stdout and "uint16" in out.stdout
    prepare(str(root / "mail.parquet"), "--out", str(root / "mail"), "--tokenizer", str(tok), "--field", "content",
            "--workers", "2")
    return root


def _blend_config(root, path):
    config = write_config(path, root / "code", train={"steps": 8}, model={"vocab_size": 400},
                          checkpoint={"every": 4})
    text = config.read_text().replace(f"dir: {root / 'code'}", "document_mask: true\n  sources:\n"
                                      f"  - {{dir: {root / 'code'}, weight: 0.7}}\n"
                                      f"  - {{dir: {root / 'mail'}, weight: 0.3}}")
    config.write_text(text)
    return config


def test_a_document_masked_blend_resumed_at_another_world_size_continues_the_same_batches(tmp_path, blend) -> None:
    config = _blend_config(blend, tmp_path / "c.yaml")
    train_forked(config, tmp_path / "whole", 1)
    train_forked(config, tmp_path / "parts", 1, "train.stop_at=4")
    proc = train_forked(config, tmp_path / "parts", 2, "parallel.ep=2")
    assert "at step 4" in proc.stdout
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [m["step"] for m in parts] == list(range(1, 9))
    for a, b in zip(whole, parts):
        assert a["tokens_per_source"] == b["tokens_per_source"], a["step"]
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5), f"step {a['step']}: another batch?"
    seen = whole[-1]["tokens_per_source"]
    assert seen == {"code": round(0.7 * 128) * 32, "mail": round(0.3 * 128) * 32}
    manifest = json.loads((tmp_path / "parts" / "checkpoints" / "step_000008" / "manifest.json").read_text())
    assert manifest["data"]["position"]["drawn"] == {"code": 90, "mail": 38}
    assert manifest["data"]["tokenizer"]["vocab_size"] == 400


def test_a_corpus_the_model_cannot_embed_or_of_another_tokenizer_is_refused_before_training(tmp_path, blend) -> None:
    config = _blend_config(blend, tmp_path / "c.yaml")
    small = run_moeyard_train(config, tmp_path / "small", 2, "model.vocab_size=300")
    assert small.returncode != 0 and "model.vocab_size=300 is smaller than the 400 token ids" in small.stderr
    assert "tok" in small.stderr and not (tmp_path / "small" / "metrics.jsonl").exists()
    other = word_level(tmp_path / "words", 300)
    (tmp_path / "w.jsonl").write_text(json.dumps({"text": "w1 w2 w3 " * 500}) + "\n")
    prepare(str(tmp_path / "w.jsonl"), "--out", str(tmp_path / "words_corpus"), "--tokenizer", str(other))
    text = config.read_text().replace(str(blend / "mail"), str(tmp_path / "words_corpus"))
    (tmp_path / "mixed.yaml").write_text(text)
    mixed = run_moeyard_train(tmp_path / "mixed.yaml", tmp_path / "mixed", 2)
    assert mixed.returncode != 0 and "were tokenized differently" in mixed.stderr, mixed.stderr
    assert "'tok'" in mixed.stderr and "'words'" in mixed.stderr


def test_a_corpus_of_a_vocabulary_past_16_bits_trains(tmp_path) -> None:
    tok = word_level(tmp_path / "words", 70_000)
    words = " ".join(f"w{(i * 7919) % 69_990 + 2}" for i in range(6_000))
    (tmp_path / "w.jsonl").write_text(json.dumps({"text": words}) + "\n")
    out = prepare(str(tmp_path / "w.jsonl"), "--out", str(tmp_path / "corpus"), "--tokenizer", str(tok))
    assert "uint32" in out.stdout
    config = write_config(tmp_path / "c.yaml", tmp_path / "corpus", train={"steps": 3},
                          model={"vocab_size": 70_000})
    train_forked(config, tmp_path / "run", 2, "parallel.ep=2")
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3 and metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert metrics[0]["lm_loss"] == pytest.approx(__import__("math").log(70_000), abs=0.5), "ids past 65,535 lost?"
