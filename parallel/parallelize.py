"""The one place where a Plan becomes running objects: expert shards, exchanges, gradient sync.

The model is a single-device `Transformer`; `parallelize` applies everything the
plan says from the outside, as torchtitan's `parallelize_*` functions do, and the
trainer only calls it.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from moeyard.models import Transformer
from moeyard.parallel.exchange.dispatch import ExpertParallelExchange
from moeyard.parallel.grads.buckets import BucketedReducer
from moeyard.parallel.grads.reduce import ParamGroups, split_parameters
from moeyard.parallel.grads.sync import GradSync, OverlappedSync, PlainSync, ShardedSync
from moeyard.parallel.grads.zero import ShardedAdamW
from moeyard.parallel.mesh import ParallelMesh
from moeyard.parallel.scheduler.plan import Plan


class AdamWSettings(Protocol):
    """The optimizer's hyperparameters (the trainer's `optim` config section has these fields)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def apply_expert_parallel(model: Transformer, pmesh: ParallelMesh, chunks: Optional[tuple[int, ...]] = None) -> None:
    """Keep this rank's slice of every expert weight (dim 0) and install the all-to-all exchange, pipelined
    in `chunks[i]` pieces in the i-th MoE layer (default: 1, the plain exchange).

    Call before building the optimizer: expert parameters are replaced by their shard.
    """
    layers = list(model.moe_layers())
    chunks = chunks or (1,) * len(layers)
    if len(chunks) != len(layers):
        raise ValueError(f"the plan has chunks for {len(chunks)} MoE layers, the model has {len(layers)}")
    for (layer, moe), r in zip(layers, chunks):
        num_experts = moe.cfg.num_experts
        if num_experts % pmesh.ep != 0:
            raise ValueError(f"MoE layer {layer} has {num_experts} experts (model.moe.num_experts or "
                             f"num_experts_per_layer), not divisible by parallel.ep={pmesh.ep}")
        local = num_experts // pmesh.ep
        start = pmesh.ep_rank * local
        experts = moe.experts
        for name, weight in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(weight.detach()[start:start + local].clone(),
                                                  requires_grad=weight.requires_grad))
        moe.exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks=r)


def adamw(model: nn.Module, settings: AdamWSettings) -> torch.optim.AdamW:
    """torch's AdamW over the trainable parameters; matrices decay (embeddings, projections, experts), norm
    gains do not. Element-wise, so a sharded expert's update equals the unsharded one."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
    )


def grad_sync_for(plan: Plan, model: nn.Module, groups: ParamGroups, pmesh: ParallelMesh,
                  settings: AdamWSettings) -> GradSync:
    """The gradient reduction and optimizer the plan names, over the model's (sharded) parameters."""
    if plan.grad_sync == "reduce_scatter":
        reducer = BucketedReducer(groups, pmesh, plan.dense_buckets, plan.expert_buckets, "reduce_scatter")
        sharded = ShardedAdamW(reducer, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                               weight_decay=settings.weight_decay)
        return ShardedSync(groups, pmesh, reducer, sharded)
    optimizer = adamw(model, settings)
    if not plan.overlap_grads:
        return PlainSync(groups, pmesh, optimizer)
    return OverlappedSync(groups, pmesh, optimizer,
                          BucketedReducer(groups, pmesh, plan.dense_buckets, plan.expert_buckets, "all_reduce"))


def parallelize(model: Transformer, pmesh: ParallelMesh, plan: Plan, optim: AdamWSettings,
                device: torch.device) -> GradSync:
    """Shard the experts over ep with each MoE layer's pipelined exchange, move this rank's part of the
    model to `device`, and build the gradient sync (buckets, reduction, optimizer) the plan says."""
    apply_expert_parallel(model, pmesh, plan.chunks)
    model.to(device)
    return grad_sync_for(plan, model, split_parameters(model), pmesh, optim)
