"""A checkpoint written by an older moeyard still resumes, `--init`s and loads.

tests/fixtures/checkpoint_before_restructure holds step 2 of a 4-step run at 2 ranks, ep=2 (weights,
AdamW state, RNG), written by the code before the issue-17 restructure, with the losses and logits that
code measured (expected.json). Whatever moves inside the package, these files must keep working.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES
from helpers.runs import moeyard_train, read_metrics

from moeyard.models import build_model
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.config.sections import read_config

FIXTURE = FIXTURES / "checkpoint_before_restructure"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _train(run_dir: Path, *overrides: str) -> list[float]:
    moeyard_train(FIXTURE / "config.yaml", run_dir, 2, f"data.dir={FIXTURE / 'corpus'}", *overrides)
    return [m["loss"] for m in read_metrics(run_dir)]


def test_old_checkpoint_resumes_with_the_losses_the_old_code_measured(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_000002", run_dir / "checkpoints" / "step_000002")
    (run_dir / "checkpoints" / "latest").write_text("step_000002")
    losses = _train(run_dir)
    assert losses == pytest.approx(EXPECTED["losses"][2:], rel=1e-5)


def test_a_fresh_run_repeats_the_losses_the_old_code_measured(tmp_path):
    """Same seed, same data, same config: initialisation, batches and steps are what they were."""
    losses = _train(tmp_path / "run", "train.stop_at=2")
    assert losses == pytest.approx(EXPECTED["losses"][:2], rel=1e-5)


def test_old_checkpoint_inits_a_new_run_with_the_old_first_loss(tmp_path):
    losses = _train(tmp_path / "run", f"checkpoint.init={FIXTURE / 'step_000002'}", "train.steps=1")
    assert losses == pytest.approx([EXPECTED["init_first_loss"]], rel=1e-5)


def test_old_checkpoint_loads_into_one_process_with_the_old_logits():
    cfg = read_config(FIXTURE / "config.yaml", [f"data.dir={FIXTURE / 'corpus'}"])
    model = build_model(cfg.model)
    load_full_model(FIXTURE / "step_000002", model)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(EXPECTED["probe_tokens"])).logits_BTV.double()
    assert float(logits.sum()) == pytest.approx(EXPECTED["probe_logits_sum"], rel=1e-5)
    assert float(logits.abs().sum()) == pytest.approx(EXPECTED["probe_logits_abs_sum"], rel=1e-5)
    assert logits[0, 0, :8].tolist() == pytest.approx(EXPECTED["probe_logits_first"], rel=1e-5, abs=1e-7)
