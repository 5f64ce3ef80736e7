"""Converted Hugging Face models compute what transformers computes, at ep=1 and ep=2 (gloo), and round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.hf_cases import hf_logits, moeyard_logits, save_random_model, sharded_logits
from helpers.multiprocess import run_distributed

pytest.importorskip("transformers")
from moeyard.launch.cli import main  # noqa: E402

TOKENS = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_from_hf_matches_transformers_at_ep1_and_ep2_and_round_trips(family: str, tmp_path: Path) -> None:
    hf_dir = save_random_model(family, tmp_path / "hf")
    expected = hf_logits(hf_dir, TOKENS)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(ckpt)]) == 0

    assert (moeyard_logits(ckpt, TOKENS) - expected).abs().max() < 1e-4
    halves = run_distributed(sharded_logits, 2, str(ckpt), TOKENS, timeout_s=120)
    assert (torch.cat(halves) - expected).abs().max() < 1e-4

    back = tmp_path / "back"
    assert main(["convert", "to-hf", str(ckpt), "--out", str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["model_type"] == family
    assert (hf_logits(back, TOKENS) - expected).abs().max() < 1e-4
