"""Bodies of multi-process tests (run through helpers.multiprocess.run_distributed, which spawned workers
import by name); the tests check what they return."""
from __future__ import annotations

import torch

from moeyard.parallel import build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def watch_launches(reducer, launches: list[bool]) -> None:
    """Record, for every bucket launch, whether it came during backward rather than from finish()."""
    launch, finish = reducer._launch, reducer.finish
    finishing = [False]

    def watched_launch(bucket) -> None:
        launches.append(not finishing[0])
        launch(bucket)

    def watched_finish() -> None:
        finishing[0] = True
        finish()
        finishing[0] = False

    reducer._launch, reducer.finish = watched_launch, watched_finish


def train_with_each_sync(rank: int, world: int, ep: int, steps: int, reduce_dtype: str = "float32",
                         moment_dtype: str = "float32") -> dict:
    """Train the same model `steps` steps (2 accumulated micro-steps each) with the plain reduction, the
    bucketed overlapped all-reduce and ZeRO reduce-scatter + sharded AdamW. Returns, per strategy, this
    rank's parameters and AdamW state by name, the grad norms, the number of buckets and, per bucket launch,
    whether it happened during backward (from a hook), the dtype the buckets reduce in and the dtype the
    AdamW moments are stored in (`moment_dtype` bfloat16: LowPrecisionMomentsAdamW, ZeRO's shards alike)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.adamw import LowPrecisionMomentsAdamW
    from moeyard.parallel.grads.buckets import BucketedReducer, backward_order, bucket_sizes
    from moeyard.parallel.grads.sync import OverlappedSync, PlainSync, ShardedSync
    from moeyard.parallel.grads.zero import ShardedAdamW
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32, num_shared_experts=1))
    pmesh = build_mesh(ep, "cpu")
    data = torch.randint(0, 64, (steps, world * 2, 17), generator=torch.Generator().manual_seed(11))
    moments = getattr(torch, moment_dtype)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, moment_dtype=moments)

    def torch_adamw(model):
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if moments != torch.float32:
            return LowPrecisionMomentsAdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                            moment_dtype=moments)
        return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)

    def run(kind: str) -> dict:
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_expert_parallel(model, pmesh)
        groups = split_parameters(model)
        small = 4096.0  # bytes: many small buckets, so several launch mid-backward
        dense = bucket_sizes([p.numel() * 4 for p in backward_order(groups.dense)], small)
        expert = bucket_sizes([p.numel() * 4 for p in backward_order(groups.expert)], small)
        launches: list[bool] = []
        dtype = getattr(torch, reduce_dtype)
        flat_dtypes = [str(dtype)]
        if kind == "plain":
            sync = PlainSync(groups, pmesh, torch_adamw(model), dtype)
        else:
            reducer = BucketedReducer(groups, pmesh, dense, expert, "all_reduce" if kind == "overlap"
                                      else "reduce_scatter", dtype)
            flat_dtypes = sorted({str(b.flat.dtype) for b in reducer.buckets})
            watch_launches(reducer, launches)
            sync = (OverlappedSync(groups, pmesh, torch_adamw(model), reducer) if kind == "overlap"
                    else ShardedSync(groups, pmesh, reducer, ShardedAdamW(reducer, **hyper)))
        norms = [train_step(model, sync, data[step, rank * 2:(rank + 1) * 2], micro_batch_size=1, pmesh=pmesh,
                            lr=3e-3, grad_clip=0.5, dtype=torch.float32).grad_norm for step in range(steps)]
        states = sync.param_states()
        # numpy arrays travel back by value (torch tensors would be shared through this process' file
        # descriptors, gone once it exits)
        return {"params": {n: p.detach().numpy().copy() for n, p in model.named_parameters()},
                "states": {n: {k: v.float().numpy().copy() for k, v in states[id(p)].items()}
                           for n, p in model.named_parameters()},
                "moment_dtypes": sorted({str(s["exp_avg"].dtype) for s in states.values()}),
                "norms": norms, "buckets": len(dense) + len(expert), "launches": launches, "flat_dtypes": flat_dtypes}

    return {kind: run(kind) for kind in ("plain", "overlap", "zero")}
