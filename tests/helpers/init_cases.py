"""Bodies of multi-process tests of meta-device initialisation (run through helpers.multiprocess)."""
from __future__ import annotations

import torch


def sharded_init_equals_plain_construction(rank: int, world: int, ep: int, fsdp: bool, peft: bool) -> dict:
    """Build on the meta device, shard (ep, fsdp), materialise: every parameter, gathered, equals
    `build_model(cfg)` under the same seed bit for bit, and the generator ends in the same state."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from moeyard.models import ModelConfig, MoEConfig, build_model, expert_parameter_ids
    from moeyard.models.config import PEFTConfig
    from moeyard.models.meta_init import build_on_meta
    from moeyard.parallel import build_mesh
    from moeyard.parallel.fsdp import global_expert_view
    from moeyard.parallel.parallelize import parallelize
    from moeyard.parallel.plan import Plan
    from moeyard.trainer.config.sections import OptimConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      tie_embeddings=True,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32, num_shared_experts=1, first_dense_layers=1,
                                    router="sigmoid_bias"),
                      peft=PEFTConfig(method="lora_moe", targets=["*.attn.wq"], num_experts=2, rank=4, top_k=1)
                      if peft else PEFTConfig())
    torch.manual_seed(3)
    reference = build_model(cfg)
    rng_after_reference = torch.get_rng_state()

    pmesh = build_mesh(ep, "cpu")
    torch.manual_seed(3)
    model, init = build_on_meta(cfg)
    plan = Plan(chunks=(1, 1), dense_buckets=(), expert_buckets=(), grad_sync="fsdp" if fsdp else "all_reduce",
                overlap_grads=False)
    parallelize(model, pmesh, plan, OptimConfig(), torch.device("cpu"), init=init)
    expert_ids = expert_parameter_ids(model)
    mismatched, local_numel, total_numel = [], 0, 0
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expert = id(p) in expert_ids
        if isinstance(p, DTensor):
            local_numel += p.to_local().numel()
            full = (global_expert_view(p, pmesh) if expert else p).full_tensor()
        else:
            local_numel += p.numel()
            full = DTensor.from_local(p.detach(), pmesh.mesh, [Replicate(), Shard(0)]).full_tensor() if expert \
                else p.detach()
        total_numel += ref_params[name].numel()
        if not torch.equal(full, ref_params[name].detach()):
            mismatched.append(name)
    buffers_equal = all(torch.equal(b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers())
    return {"mismatched": mismatched, "rng_equal": torch.equal(torch.get_rng_state(), rng_after_reference),
            "buffers_equal": buffers_equal, "tied": model.output.weight is model.tok_embeddings.weight,
            "local_fraction": local_numel / total_numel}
