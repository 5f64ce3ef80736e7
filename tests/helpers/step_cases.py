"""Bodies of multi-process tests (run through helpers.multiprocess.run_distributed, which spawned workers
import by name); the tests check what they return."""
from __future__ import annotations

import dataclasses

import torch

from helpers.collective_counts import counting_collectives
from moeyard.parallel import build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def step_gradients_match_single_process(rank: int, world: int, ep: int, micro_batch_size: int,
                                        aux_loss_coef: float, router: str = "topk_softmax",
                                        balance_loss: str = "batch") -> dict:
    """train_step's scaled, reduced gradients and grad norm equal plain backprop of the global batch.

    The aux loss balances each (dp-wide) micro-batch, so with accumulation the
    reference matches only with aux_loss_coef=0.
    """
    import torch.nn.functional as nnf

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.models.config import DenseToSparseSettings
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, top_k=1 if router == "switch" else 2, ffn_dim=32,
                                    num_shared_experts=1, aux_loss_coef=aux_loss_coef, router=router,
                                    balance_loss=balance_loss, dense_to_sparse=DenseToSparseSettings(steps=4)))
    per_rank = 2
    tokens = torch.randint(0, 64, (world * per_rank, 17), generator=torch.Generator().manual_seed(5))

    def prime_router_state(model) -> None:
        """Mid-schedule and with biases, so the test is not only about the routers' starting state."""
        for _, moe in model.moe_layers():
            if router == "sigmoid_bias":
                moe.router.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, cfg.moe.num_experts))
            if router == "dense_to_sparse":
                moe.router.steps_done.fill_(2)  # 8 - 6 * 2 // 4 = 5 experts per token

    torch.manual_seed(0)
    reference = Transformer(cfg)
    prime_router_state(reference)
    out = reference(tokens[:, :-1])
    lm = nnf.cross_entropy(out.logits_BTV.flatten(0, 1), tokens[:, 1:].flatten())
    (lm + out.aux_loss + out.z_loss).backward()
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in reference.parameters()))

    pmesh = build_mesh(ep, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    prime_router_state(model)
    apply_expert_parallel(model, pmesh)
    frozen = PlainSync(split_parameters(model), pmesh, torch.optim.SGD(model.parameters(), lr=0.0))
    result = train_step(model, frozen, tokens[rank * per_rank:(rank + 1) * per_rank], micro_batch_size=micro_batch_size,
                        pmesh=pmesh, lr=0.0, grad_clip=0.0, dtype=torch.float32)

    local = cfg.moe.num_experts // ep
    expert_names = {n for n, _ in model.named_parameters() if ".experts." in n}
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if name in expert_names:
            expected = expected[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert abs(result.grad_norm - float(ref_norm)) <= 1e-5 * float(ref_norm)
    assert abs(result.lm_loss - float(lm)) <= 1e-5 * float(lm)

    if router not in ("expert_choice", "switch"):  # expert skipping at evaluation: same logits and count at any ep
        ref_buffers = dict(reference.named_buffers())
        for name, b in model.named_buffers():  # router state after the step (biases, schedule) is replicated
            ref_buffers[name].copy_(b)
        for m in (reference, model):
            for _, moe in m.moe_layers():
                moe.cfg = dataclasses.replace(moe.cfg, skip_threshold=0.3)
                with torch.no_grad():  # peaked routing, as trained routers have, so that some weights are low
                    moe.router.weight_ED.mul_(50)
        with torch.no_grad():
            ref_out, out = reference.eval()(tokens[:, :-1]), model.eval()(tokens[rank * per_rank:(rank + 1) * per_rank, :-1])
        torch.testing.assert_close(out.logits_BTV, ref_out.logits_BTV[rank * per_rank:(rank + 1) * per_rank],
                                   rtol=1e-5, atol=1e-6)
        for layer, stats in out.moe_stats.items():
            assert int(stats.skipped) == int(ref_out.moe_stats[layer].skipped) > 0, layer
    return {"grad_norm": result.grad_norm}


def nonfinite_step_is_skipped(rank: int, world: int) -> dict:
    """A NaN gradient on one rank: every rank skips the update (parameters and AdamW state unchanged)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))
    pmesh = build_mesh(world, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_expert_parallel(model, pmesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sync = PlainSync(split_parameters(model), pmesh, optimizer)
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    poison = [rank == 1]

    def maybe_nan(grad):
        return torch.full_like(grad, float("nan")) if poison[0] else grad

    model.output.weight.register_hook(maybe_nan)
    before = [p.detach().clone() for p in model.parameters()]
    bad = train_step(model, sync, batch, micro_batch_size=2, pmesh=pmesh, lr=1e-2, grad_clip=1.0, dtype=torch.float32)
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    poison[0] = False
    good = train_step(model, sync, batch, micro_batch_size=2, pmesh=pmesh, lr=1e-2, grad_clip=1.0, dtype=torch.float32)
    changed = not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return {"skipped": (bad.skipped, good.skipped), "unchanged_after_bad": unchanged, "changed_after_good": changed,
            "optimizer_steps": int(next(iter(optimizer.state.values()))["step"])}


def fsdp_step_gradients_match_single_process(rank: int, world: int, ep: int, micro_batch_size: int,
                                             recompute: str, num_experts: int = 8, gather_once: bool = False,
                                             per_rank: int = 2, reduce_once: bool = True,
                                             compute_dtype: str = "float32") -> dict:
    """With FSDP2 (parallel.fsdp), train_step's reduce-scattered gradients, gathered, equal plain backprop of
    the global batch, and so does the grad norm. Aux loss off: with accumulation it balances per micro-batch.
    Also returns how many all-gathers and reduce-scatters FSDP2 issued in the step, and its units.
    `compute_dtype` bfloat16: FSDP2 gathers bf16 weights from the float32 shards and reduces in float32."""
    import torch.nn.functional as nnf
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.fsdp import apply_fsdp, mixed_precision
    from moeyard.parallel.grads.sync import FullyShardedSync
    from moeyard.trainer.data.sft_batches import SFTBatch
    from moeyard.trainer.scheduler.memory_model import count_parameters
    from moeyard.trainer.step import heldout_loss, train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=num_experts, top_k=2, ffn_dim=32, num_shared_experts=1,
                                    aux_loss_coef=0.0, first_dense_layers=1))
    tokens = torch.randint(0, 64, (world * per_rank, 17), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    reference = Transformer(cfg)
    out = reference(tokens[:, :-1])
    lm = nnf.cross_entropy(out.logits_BTV.flatten(0, 1), tokens[:, 1:].flatten())
    (lm + out.aux_loss + out.z_loss).backward()
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in reference.parameters()))
    dtype = getattr(torch, compute_dtype)

    pmesh = build_mesh(ep, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.set_recompute(recompute)
    apply_expert_parallel(model, pmesh)
    apply_fsdp(model, pmesh, reshard_after_forward=not gather_once, policy=mixed_precision(dtype, torch.float32))
    groups = split_parameters(model)
    sync = FullyShardedSync(groups, pmesh, torch.optim.SGD(model.parameters(), lr=0.0),
                            gather_once_model=model if gather_once else None, reduce_once=reduce_once)
    residual_dtypes = set()  # what each block is handed: the residual stream
    hooks = [block.register_forward_pre_hook(lambda module, args: residual_dtypes.add(str(args[0].dtype)))
             for block in model.layers]
    with counting_collectives() as counts:
        result = train_step(model, sync, tokens[rank * per_rank:(rank + 1) * per_rank],
                            micro_batch_size=micro_batch_size, pmesh=pmesh, lr=0.0, grad_clip=0.0, dtype=dtype)
    for hook in hooks:
        hook.remove()
    # A held-out evaluation (no backward) must leave every parameter the sharded DTensor that checkpoints read.
    share = tokens[rank * per_rank:(rank + 1) * per_rank]
    heldout_loss(model, SFTBatch(share, torch.ones_like(share[:, 1:], dtype=torch.bool), torch.ones_like(share),
                                 global_targets=tokens[:, 1:].numel()),
                 micro_batch_size=micro_batch_size, pmesh=pmesh, dtype=torch.float32)
    sharded_after_eval = all(isinstance(p, DTensor) for p in model.parameters())

    local = cfg.moe.num_experts // ep
    expert_ids = {id(p) for p in groups.expert}
    ref_params = dict(reference.named_parameters())
    worst = {}
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if id(p) in expert_ids:
            expected = expected[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local]
        got = p.grad.full_tensor()
        worst[name] = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
    return {"grad_norm": result.grad_norm, "ref_norm": float(ref_norm), "lm_loss": result.lm_loss,
            "ref_lm_loss": lm.item(), "worst": worst,
            "dense_sharded": all(p.to_local().numel() < p.numel() for p in groups.dense if p.dim() >= 2),
            "experts_sharded": all(p.to_local().numel() < p.numel() for p in groups.expert),
            "expert_shard_numel": sum(p.to_local().numel() for p in groups.expert),
            "expert_shard_dims": sorted({p.placements[0].dim for p in groups.expert}),
            "units": sum(isinstance(m, FSDPModule) for m in model.modules()), **counts,
            "shard_numel": sum(p.to_local().numel() for p in model.parameters()),
            "predicted_shard_numel": count_parameters(cfg, ep).fsdp_shard(world, ep)[0],
            "sharded_after_eval": sharded_after_eval, "residual_dtypes": sorted(residual_dtypes)}
