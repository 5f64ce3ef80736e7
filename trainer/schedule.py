"""From the config's `schedule` section to a Plan, and from a Plan to the objects that run it."""
from __future__ import annotations

import torch
from torch import nn

from moeyard.models import ConfigError, Transformer
from moeyard.parallel import ParallelMesh, ParamGroups
from moeyard.parallel.buckets import BucketedReducer, backward_order, buckets_by_bytes
from moeyard.parallel.grad_sync import GradSync, OverlappedSync, PlainSync, ShardedSync
from moeyard.parallel.plan import Plan
from moeyard.parallel.zero import ShardedAdamW

from .config import Config
from .optim import build_optimizer


def fixed_plan(cfg: Config, model: Transformer, groups: ParamGroups) -> Plan:
    """The plan for schedule.mode off or manual (auto goes through the planner)."""
    n_moe = sum(1 for _ in model.moe_layers())
    s = cfg.schedule
    if s.mode == "off":
        return Plan(chunks=(1,) * n_moe, dense_buckets=(len(groups.dense),),
                    expert_buckets=(len(groups.expert),) if groups.expert else (), grad_sync=s.grad_sync,
                    overlap_grads=s.grad_sync == "reduce_scatter", source="off")
    cap = s.bucket_mb * 2**20
    return Plan(chunks=(s.chunks,) * n_moe,
                dense_buckets=buckets_by_bytes(backward_order(groups.dense), cap),
                expert_buckets=buckets_by_bytes(backward_order(groups.expert), cap),
                grad_sync=s.grad_sync, overlap_grads=True, source="manual")


def apply_plan_chunks(model: Transformer, plan: Plan) -> None:
    layers = list(model.moe_layers())
    if len(plan.chunks) != len(layers):
        raise ValueError(f"the plan has chunks for {len(plan.chunks)} MoE layers, the model has {len(layers)}")
    for (_, moe), chunks in zip(layers, plan.chunks):
        if hasattr(moe.exchange, "chunks"):
            moe.exchange.chunks = chunks


def build_grad_sync(plan: Plan, model: nn.Module, groups: ParamGroups, pmesh: ParallelMesh, cfg: Config) -> GradSync:
    if plan.grad_sync == "reduce_scatter":
        reducer = BucketedReducer(groups, pmesh, plan.dense_buckets, plan.expert_buckets, "reduce_scatter")
        o = cfg.optim
        sharded = ShardedAdamW(reducer, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        return ShardedSync(groups, pmesh, reducer, sharded)
    optimizer = build_optimizer(model, cfg.optim)
    if not plan.overlap_grads:
        return PlainSync(groups, pmesh, optimizer)
    return OverlappedSync(groups, pmesh, optimizer,
                          BucketedReducer(groups, pmesh, plan.dense_buckets, plan.expert_buckets, "all_reduce"))


def plan_for(cfg: Config, model: Transformer, groups: ParamGroups) -> Plan:
    if cfg.schedule.mode == "auto":
        raise ConfigError("schedule.mode=auto needs the planner, which is not in this build: use off or manual")
    return fixed_plan(cfg, model, groups)
