"""`moeyard sft --init`: starts from the checkpoint, reports the held-out loss, refuses a model that does not
fit the checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.runs import SMALL, read_metrics
from helpers.sft_cases import random_conversations

from moeyard.models import ModelConfig, build_model
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.config.resolve import resolve_run
from moeyard.trainer.config.yaml_tree import build_dataclass as _build
from moeyard.trainer.data.sft_batches import SFTBatches, SFTData
from moeyard.trainer.step import lm_loss_sum


def _sft_setup(tmp_path: Path) -> tuple[Path, Path, ModelConfig]:
    model_cfg = _build(ModelConfig, SMALL["model"], "model")
    torch.manual_seed(11)
    init = write_weights_checkpoint({n: p.detach() for n, p in build_model(model_cfg).named_parameters()},
                                    model_cfg, tmp_path / "init", {"format": "test"})
    data = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": c}) for c in random_conversations(80, seed=5)]
    data.write_text("\n".join(lines[:10] + ['{"prompt": 3}'] + lines[10:]) + "\n")
    tree = {k: v for k, v in json.loads(json.dumps(SMALL)).items() if k != "model"}
    tree["train"]["steps"] = 4
    tree["parallel"] = {"ep": 2, "timeout_s": 120}
    tree["sft"] = {"data": str(data), "skip_malformed": True, "eval_every": 2, "heldout_fraction": 0.1}
    tree["run"]["dir"] = str(tmp_path / "run")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config, init, model_cfg


def _moeyard(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "moeyard", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"moeyard {' '.join(args)} did not finish within {timeout_s} s:\n{err.stderr}") from None


def test_moeyard_sft_starts_from_init_and_reports_heldout_loss(tmp_path: Path) -> None:
    config, init, model_cfg = _sft_setup(tmp_path)
    # Expert skipping at 0.5 leaves out every renormalised second choice (< 0.5 but for exact ties): half
    # of the held-out evaluation's expert computations; training never skips (step 1's loss below).
    skip = ("--set", "model.moe.skip_threshold=0.5")
    proc = _moeyard("sft", str(config), "--init", str(init), "--nproc", "2", *skip)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 malformed lines skipped" in proc.stdout and f"initialised from {init}" in proc.stdout

    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["eval_loss"] is not None] == [2, 4]
    assert all(r["eval_skipped_fraction"] == pytest.approx(0.5, abs=1e-3) for r in records if r["eval_loss"])
    # Step 1's loss is the init weights' assistant-only loss on global batch 0: the weights were loaded.
    cfg = resolve_run(config, [f"checkpoint.init={init}"])
    whole = SFTBatches(SFTData(cfg), cfg.global_batch_sequences, 0, 1, cfg.run.seed).batch(0)
    model = build_model(model_cfg)
    load_full_model(init, model)
    with torch.no_grad():
        out = model(whole.tokens_BT1[:, :-1], whole.segment_BT1[:, :-1])
    expected = lm_loss_sum(out.logits_BTV, whole.tokens_BT1[:, 1:], whole.mask_BT) / whole.global_targets
    assert abs(records[0]["lm_loss"] - expected.item()) < 1e-5

    evaluated = _moeyard("sft-eval", str(config), "--set", f"checkpoint.init={init}", "--limit", "4",
                         "--skip-threshold", "0.5")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.count("exact match") == 2  # before (init) and after (the run's checkpoint)
    assert evaluated.stdout.count("expert skipping below weight 0.5 left out 50.0% of expert computations") == 2

    # The run resumes on its own checkpoint: the init weights may be gone by then.
    init.rename(tmp_path / "moved")
    again = _moeyard("sft", str(config), "--init", str(init), "--nproc", "2", *skip)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do: the run is at step 4" in again.stdout


def test_sft_refuses_a_model_config_that_does_not_fit_init(tmp_path: Path) -> None:
    config, init, _ = _sft_setup(tmp_path)
    proc = _moeyard("sft", str(config), "--init", str(init), "--set", "model.dim=128", timeout_s=60)
    assert proc.returncode == 2
    assert "model.dim=128 differs from the checkpoint" in proc.stderr
    assert not (tmp_path / "run").exists()
