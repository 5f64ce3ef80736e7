"""Bodies of the host-sync budget tests: a tiny MoE model on the GPU path (grouped GEMM, which torch also
runs on CPU), its forward and backward counted by helpers.host_syncs."""
from __future__ import annotations

from typing import Optional

import torch

from helpers.host_syncs import counting_host_syncs
from moeyard.models import ModelConfig, MoEConfig, Transformer

MOE_LAYERS = 2


def tiny_model(capacity_factor: Optional[float] = None, router: str = "topk_softmax") -> Transformer:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=0, expert_compute="grouped_mm",
                    capacity_factor=capacity_factor, router=router)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=MOE_LAYERS, n_heads=2, n_kv_heads=1,
                                   ffn_dim=64, max_seq_len=32, moe=moe))


def count_step(model: Transformer, tokens_BT: torch.Tensor) -> dict:
    """Host syncs of one forward (with the losses the trainer reads from it) and of its backward; a first
    uncounted step leaves lazy initialisation out."""
    for counted in (False, True):
        with counting_host_syncs() as forward:
            out = model(tokens_BT)
            loss = out.logits_BTV.float().square().mean() + out.aux_loss + out.z_loss
        with counting_host_syncs() as backward:
            loss.backward()
    return {"forward": forward.count, "backward": backward.count, "where": f"forward:\n{forward}\n"
            f"backward:\n{backward}"}


def count_step_at_ep(rank: int, world: int, chunks: int, capacity_factor: Optional[float]) -> dict:
    from moeyard.parallel import apply_expert_parallel, build_mesh

    model = tiny_model(capacity_factor)
    apply_expert_parallel(model, build_mesh(world, "cpu"), (chunks,) * MOE_LAYERS)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    return count_step(model, tokens)
