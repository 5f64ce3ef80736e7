"""Continued pretraining of an imported Qwen3-MoE, as the README shows it: convert from-hf (with the
tokenizer the folder carries) -> prepare with that tokenizer -> train --init -> convert to-hf ->
transformers loads, scores held-out text and generates. The HF folder is built here: no download."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from moeyard.trainer.data.tokens import stdlib_dir
from tests.helpers.hf_cases import save_random_model
from tests.helpers.runs import SMALL, moeyard_train, read_metrics, run_moeyard_train
from tests.helpers.tokenizer_cases import train_bpe

pytest.importorskip("transformers")
VOCAB = 384


def moeyard(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "moeyard", *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"moeyard {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def heldout_loss(hf_dir, text: str) -> float:
    """Mean next-token loss of transformers' own model on `text`, in windows of 64 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    with torch.no_grad():
        return float(model(windows, labels=windows).loss)


def test_continued_pretraining_of_an_imported_qwen3_moe(tmp_path) -> None:
    train_files = sorted((stdlib_dir() / "email").glob("*.py"))
    heldout = (stdlib_dir() / "json" / "decoder.py").read_text() + (stdlib_dir() / "json" / "encoder.py").read_text()
    texts = [p.read_text() for p in train_files]
    hf = save_random_model("qwen3_moe", tmp_path / "qwen3-moe", vocab_size=VOCAB, max_position_embeddings=128)
    train_bpe(hf, texts + [heldout], vocab_size=VOCAB)  # the folder carries its tokenizer, as published ones do
    moeyard("convert", "from-hf", str(hf), "--out", str(tmp_path / "imported"))
    imported = json.loads((tmp_path / "imported" / "manifest.json").read_text())
    assert imported["source"]["tokenizer"]["vocab_size"] == VOCAB

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    moeyard("prepare", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "corpus"), "--tokenizer", str(hf))
    tree = {k: v for k, v in json.loads(json.dumps(SMALL)).items() if k != "model"}  # the model comes from --init
    tree["train"].update(steps=40, seq_len=64, global_batch_tokens=1024)
    tree["optim"].update(lr=3e-3, min_lr=3e-4, warmup_steps=4)
    tree["data"] = {"dir": str(tmp_path / "corpus"), "document_mask": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    moeyard_train(tmp_path / "c.yaml", tmp_path / "run", 2, f"checkpoint.init={tmp_path / 'imported'}",
                  "parallel.ep=2", timeout_s=400)
    losses = [m["lm_loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.5, losses

    moeyard("convert", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "tokenizer.json").is_file(), "the export lost its tokenizer"
    before, after = heldout_loss(hf, heldout), heldout_loss(tmp_path / "exported", heldout)
    print(f"held-out loss before {before:.3f} (ln V = {math.log(VOCAB):.3f}), after {after:.3f}; "
          f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert after < before - 0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    prompt = tokenizer("def ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 12 and tokenizer.decode(generated[0])

    moeyard("prepare", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "bytes"))  # the byte tokenizer
    wrong = run_moeyard_train(tmp_path / "c.yaml", tmp_path / "wrong", 1, f"checkpoint.init={tmp_path / 'imported'}",
                              f"data.dir={tmp_path / 'bytes'}")
    assert wrong.returncode != 0 and "was trained with tokenizer 'qwen3-moe'" in wrong.stderr, wrong.stderr
    assert "'bytes'" in wrong.stderr and not (tmp_path / "wrong" / "metrics.jsonl").exists()
