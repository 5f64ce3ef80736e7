"""Routed LoRA adapters: the base model's logits exactly at init; bad settings named."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig, MoEConfig, Transformer, build_model
from moeyard.models.config import PEFTConfig
from moeyard.models.peft.adapters import routed_adapters
from moeyard.trainer.step import MicroBatch, forward_and_loss

BASE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                   moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=1))


@pytest.mark.parametrize("method", ["lora", "lora_moe", "rank1_moe"])
def test_fresh_adapters_give_the_base_models_logits_exactly(method: str) -> None:
    peft = PEFTConfig(method=method, rank=4, num_experts=3, top_k=2, targets=["*.attn.w?", "*.ffn.w_up"])
    torch.manual_seed(0)
    base = Transformer(BASE)
    torch.manual_seed(0)
    tuned = build_model(dataclasses.replace(BASE, peft=peft))
    adapters = dict(routed_adapters(tuned))
    assert len(adapters) == 2 * 4 + 1  # the attention maps of both layers, the dense layer's w_up
    assert all(a.name == name for name, a in adapters.items())
    tokens = torch.randint(0, 64, (2, 17))
    assert torch.equal(base(tokens[:, :-1]).logits_BTV, tuned(tokens[:, :-1]).logits_BTV)
    first = adapters["layers.0.attn.wq.adapter"]
    experts, rank = first.A_EDR.shape[0], first.A_EDR.shape[2]
    assert (experts, rank) == {"lora": (1, 4), "lora_moe": (3, 4), "rank1_moe": (4, 1)}[method]
    loss = forward_and_loss(tuned, MicroBatch(tokens), torch.float32)
    base_loss = forward_and_loss(base, MicroBatch(tokens), torch.float32)  # the MoE base's own balance loss
    if method == "lora":  # no router, no balance loss
        assert first.router is None and loss.adapter_stats == {} and torch.equal(loss.aux_loss, base_loss.aux_loss)
    else:  # every routed adapter reports, and their balance losses reach the step's objective
        assert sorted(loss.adapter_stats) == sorted(adapters)
        assert loss.aux_loss > base_loss.aux_loss and torch.equal(loss.out.aux_loss, base_loss.aux_loss)


def test_bad_peft_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="model.peft.targets pattern '\\*.attn.q' matches no linear map"):
        build_model(dataclasses.replace(BASE, peft=PEFTConfig(method="lora_moe", targets=["*.attn.q"])))
    with pytest.raises(ConfigError, match="model.peft.top_k=3 must be between 1 and model.peft.rank"):
        PEFTConfig(method="rank1_moe", rank=2, top_k=3)
