"""Activation checkpointing (train.recompute) changes what is kept for backward, never the result."""
from __future__ import annotations

import pytest
import torch

from moeyard.models import ModelConfig, MoEConfig, Transformer
from moeyard.models.config import PEFTConfig

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                  moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=1, num_shared_experts=1,
                                aux_loss_coef=0.01, z_loss_coef=0.001))
PEFT = PEFTConfig(method="lora_moe", targets=["layers.*.attn.wq"], rank=4, num_experts=2, top_k=1)


def _backward(cfg: ModelConfig, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients, and the bytes autograd kept for backward."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.set_recompute(mode)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits_BTV.flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + out.aux_loss + out.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, kept[0]


@pytest.mark.parametrize("peft", [False, True], ids=["moe", "moe+routed-lora"])
def test_recompute_gives_the_same_loss_and_gradients_and_keeps_less(peft: bool) -> None:
    cfg = ModelConfig(**{**CFG.__dict__, "peft": PEFT}) if peft else CFG
    loss, grads, kept = _backward(cfg, "none")
    for mode in ("experts", "full"):
        loss_r, grads_r, kept_r = _backward(cfg, mode)
        assert torch.equal(loss_r, loss), mode
        assert grads_r.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{mode} {name}: {m}")
        assert kept_r < kept, f"recompute={mode} kept {kept_r} bytes for backward, not fewer than {kept}"
    assert _backward(cfg, "full")[2] < 0.5 * kept, "full recompute should keep only the blocks' inputs"
