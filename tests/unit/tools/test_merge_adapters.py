"""`moeyard convert merge-adapters`: a plain LoRA folds into the base weights with the same function; a
routed mixture is refused by name."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moeyard.launch.cli import main
from moeyard.models import ModelConfig, MoEConfig, Transformer, build_model
from moeyard.models.config import PEFTConfig
from moeyard.models.peft.adapters import routed_adapters
from moeyard.trainer.checkpoint.sharded import load_full_model, persistent_buffers
from moeyard.trainer.checkpoint.store import read_manifest
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint

BASE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                   tie_embeddings=True, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=1,
                                                      router="sigmoid_bias"))


def _tuned_checkpoint(path: Path, method: str) -> Transformer:
    """A model whose adapters have trained (B != 0) and whose router biases moved, written to `path`."""
    cfg = dataclasses.replace(BASE, peft=PEFTConfig(method=method, rank=4, targets=["*.attn.wq", "*.ffn.w_up"]))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for _, adapter in routed_adapters(model):
            adapter.B_ERO.normal_(0.0, 0.1)
        for buffer in persistent_buffers(model).values():
            buffer.normal_()
    state = {n: p.detach() for n, p in model.named_parameters()}
    write_weights_checkpoint(state, cfg, path, source={"family": "test"}, buffers=persistent_buffers(model))
    return model


def test_plain_lora_merges_into_the_same_function(tmp_path, capsys) -> None:
    tuned = _tuned_checkpoint(tmp_path / "tuned", "lora")
    assert main(["convert", "merge-adapters", str(tmp_path / "tuned"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 3 LoRA adapters" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "merged")
    assert manifest["config"]["model"]["peft"]["method"] == "none"
    merged = Transformer(BASE).eval()
    load_full_model(tmp_path / "merged", merged)
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        want, got = tuned(tokens).logits_BTV, merged(tokens).logits_BTV
        torch.manual_seed(0)
        untuned = Transformer(BASE).eval()
        untuned.load_state_dict({n: t for n, t in tuned.state_dict().items() if ".adapter." not in n})
        base_logits = untuned(tokens).logits_BTV
    assert (want - base_logits).abs().max() > 1e-2  # the adapters do change the function...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ...and the merged weights carry the change
    assert manifest["source"]["max_logit_difference"] < 1e-4


@pytest.mark.parametrize("method", ["lora_moe", "rank1_moe"])
def test_routed_adapters_are_refused_by_name(tmp_path, capsys, method: str) -> None:
    _tuned_checkpoint(tmp_path / "tuned", method)
    assert main(["convert", "merge-adapters", str(tmp_path / "tuned"), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "adapters are routed mixtures (e.g. layers.0.attn.wq.adapter" in err and "cannot be merged" in err
    assert not (tmp_path / "merged").exists()


def test_a_checkpoint_without_adapters_is_refused(tmp_path, capsys) -> None:
    model = Transformer(BASE)
    write_weights_checkpoint({n: p.detach() for n, p in model.named_parameters()}, BASE, tmp_path / "plain",
                             source={"family": "test"}, buffers=persistent_buffers(model))
    assert main(["convert", "merge-adapters", str(tmp_path / "plain"), "--out", str(tmp_path / "merged")]) == 2
    assert "has no adapters (model.peft.method=none): nothing to merge" in capsys.readouterr().err


def test_an_adapter_on_a_tied_weight_is_refused(tmp_path, capsys) -> None:
    """output.weight is the embedding table when tie_embeddings is on: folding into it changes both."""
    cfg = dataclasses.replace(BASE, peft=PEFTConfig(method="lora", rank=2, targets=["output"]))
    model = build_model(cfg)
    write_weights_checkpoint({n: p.detach() for n, p in model.named_parameters()}, cfg, tmp_path / "tied",
                             source={"family": "test"}, buffers=persistent_buffers(model))
    assert main(["convert", "merge-adapters", str(tmp_path / "tied"), "--out", str(tmp_path / "merged")]) == 2
    assert "output.adapter adapts output.weight, which is shared with another module" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
