"""The public Python API: moeyard.load_model and moeyard.load_config, in one process, no process group."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from helpers import FIXTURES

import moeyard
from moeyard.errors import CheckpointError, ConfigError
from moeyard.models import ModelConfig, MoEConfig, Transformer
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint

FIXTURE = FIXTURES / "checkpoint_before_restructure"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _probe_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(EXPECTED["probe_tokens"])).double()


def test_load_model_of_a_checkpoint_returns_its_logits_in_eval_mode_without_a_process_group():
    state = torch.get_rng_state()
    model = moeyard.load_model(FIXTURE / "step_000002")
    assert not model.training and not dist.is_initialized()
    assert torch.equal(torch.get_rng_state(), state), "load_model changed the caller's RNG"
    logits = _probe_logits(model)
    assert logits.shape == (2, 12, model.config.vocab_size)
    assert float(logits.sum()) == pytest.approx(EXPECTED["probe_logits_sum"], rel=1e-5)
    assert logits[0, 0, :8].tolist() == pytest.approx(EXPECTED["probe_logits_first"], rel=1e-5, abs=1e-7)


def test_load_model_of_a_run_folder_takes_its_newest_checkpoint(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = moeyard.load_model(FIXTURE / "step_000002")
    older = {n: p.detach() * 0.5 for n, p in newest.transformer.named_parameters()}  # other weights, same shapes
    write_weights_checkpoint(older, newest.config, checkpoints / "step_000001", {"format": "test"})
    manifest = json.loads((checkpoints / "step_000001" / "manifest.json").read_text())
    (checkpoints / "step_000001" / "manifest.json").write_text(json.dumps({**manifest, "step": 1}))  # as named
    shutil.copytree(FIXTURE / "step_000002", checkpoints / "step_000002")
    (checkpoints / "latest").write_text("step_000002")
    from_run = _probe_logits(moeyard.load_model(tmp_path / "run"))
    assert torch.equal(from_run, _probe_logits(newest))
    assert not torch.equal(from_run, _probe_logits(moeyard.load_model(checkpoints / "step_000001")))


def test_load_model_of_a_converted_checkpoint_equals_the_weights_written(tmp_path):
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    torch.manual_seed(5)
    reference = Transformer(cfg).eval()
    state = {n: p.detach().clone() for n, p in reference.named_parameters()}
    write_weights_checkpoint(state, cfg, tmp_path / "converted", {"format": "test"})
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = reference(tokens).logits_BTV
        got = moeyard.load_model(tmp_path / "converted")(tokens)
    assert torch.equal(got, expected)


def test_load_model_refuses_a_damaged_checkpoint_by_name(tmp_path):
    copy = tmp_path / "step_000002"
    shutil.copytree(FIXTURE / "step_000002", copy)
    (copy / "__0_0.distcp").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        moeyard.load_model(copy)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        moeyard.load_model(tmp_path)


def test_load_config_applies_overrides_and_takes_the_model_from_checkpoint_init(tmp_path):
    corpus = f"data.dir={FIXTURE / 'corpus'}"
    cfg = moeyard.load_config(FIXTURE / "config.yaml", [corpus, "optim.lr=0.005"])
    assert cfg.optim.lr == 0.005 and cfg.model.dim == 16
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {{init: {FIXTURE / 'step_000002'}}}\ntrain: {{seq_len: 32}}\n")
    assert moeyard.load_config(config, [corpus]).model == cfg.model
    with pytest.raises(ConfigError, match="model.dim=64 differs from the checkpoint"):
        moeyard.load_config(config, [corpus, "model.dim=64"])
