"""Activation checkpointing (train.recompute) changes what is kept for backward, never the result."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moeyard.models import ModelConfig, MoEConfig, Transformer, build_model
from moeyard.models.config import MLAConfig, PEFTConfig
from moeyard.trainer.step import MicroBatch, forward_and_loss

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                  moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=1, num_shared_experts=1,
                                aux_loss_coef=0.01, z_loss_coef=0.001))
PEFT = PEFTConfig(method="lora_moe", targets=["layers.*.attn.wq"], rank=4, num_experts=2, top_k=1)


class _LiveTensors(TorchDispatchMode):
    """Every storage an op creates while it is active; `alive_bytes` sums those still held. After a forward,
    that is what the graph keeps for backward, wherever it keeps it: autograd's saved tensors, a
    checkpoint's inputs and the outputs its selective policy caches alike (a saved_tensors_hooks counter
    sees none of what a checkpoint holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def _backward(cfg: ModelConfig, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients, and the bytes the forward left held for backward."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_recompute(mode)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with _LiveTensors() as live:
        parts = forward_and_loss(model, MicroBatch(tokens), torch.float32)  # with the adapters' balance losses
        loss = parts.lm_sum / tokens[:, 1:].numel() + parts.router_loss
    del parts
    kept = live.alive_bytes()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, kept


DESIGNS = {
    "moe": {},
    "moe+routed-lora": {"peft": PEFT},
    "mla": {"attention": "mla", "mla": MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                                 qk_rope_head_dim=4, v_head_dim=8)},
    "gpt-oss": {"attention_sinks": True, "sliding_window": 4, "attn_bias": True, "attn_out_bias": True,
                "moe": dataclasses.replace(CFG.moe, expert_bias=True, activation="swiglu_clamped")},
}


@pytest.mark.parametrize("design", DESIGNS)
def test_recompute_gives_the_same_loss_and_gradients_and_keeps_less(design: str) -> None:
    cfg = dataclasses.replace(CFG, **DESIGNS[design])
    loss, grads, none = _backward(cfg, "none")
    kept = {}
    for mode in ("selective", "experts", "full"):
        loss_r, grads_r, kept[mode] = _backward(cfg, mode)
        assert torch.equal(loss_r, loss), mode
        assert grads_r.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{mode} {name}: {m}")
        assert kept[mode] < none, f"recompute={mode} kept {kept[mode]} bytes for backward, not fewer than {none}"
    assert kept["full"] < kept["selective"], kept
    assert kept["full"] < 0.5 * none, "full recompute should keep only the blocks' inputs"


class _OpCounts(TorchDispatchMode):
    """How many times each aten op ran (cached results of selective recompute do not run)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_a_step(mode: str) -> Counter[str]:
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.set_recompute(mode)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with _OpCounts() as ops:
        model(tokens).logits_BTV.sum().backward()
    return ops.counts


def test_selective_recompute_runs_no_gemm_again_and_recomputes_the_cheap_ops() -> None:
    """selective keeps every GEMM's output (dense, shared and routed experts alike) and runs attention's core,
    the norms and the activation functions again in backward; full runs GEMMs again too."""
    none, selective, full = (_ops_of_a_step(mode) for mode in ("none", "selective", "full"))
    gemms = ("aten.mm", "aten.addmm", "aten.bmm")
    assert [selective[op] for op in gemms] == [none[op] for op in gemms]
    assert full["aten.mm"] > none["aten.mm"]
    attention_core = next(op for op in none if op.startswith("aten._scaled_dot_product") and "backward" not in op)
    assert selective[attention_core] == 2 * none[attention_core], "attention's core runs again once per block"
    for op in ("aten.rsqrt", "aten.silu"):  # RMSNorm's and SwiGLU's
        assert selective[op] > none[op], f"{op} is not recomputed"
