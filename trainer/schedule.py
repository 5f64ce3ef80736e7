"""From the config's `schedule` section to a Plan, and from a Plan to the objects that run it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeyard.models import Transformer
from moeyard.parallel import ParallelMesh, ParamGroups
from moeyard.parallel.grads.buckets import BucketedReducer, backward_order, buckets_by_bytes
from moeyard.parallel.grads.sync import GradSync, OverlappedSync, PlainSync, ShardedSync
from moeyard.parallel.grads.zero import ShardedAdamW
from moeyard.parallel.scheduler.cost_model import Costs, Workload, predict, workload_for
from moeyard.parallel.scheduler.hardware import Hardware, HardwareCosts
from moeyard.parallel.scheduler.plan import Plan
from moeyard.parallel.scheduler.planner import search, with_prediction
from moeyard.parallel.scheduler.profiler import MeasuredCosts, load_or_measure
from moeyard.trainer.config import Config
from moeyard.trainer.data.tokens import default_cache_root
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.optim import build_optimizer
from moeyard.trainer.precision import resolve_dtype


def fixed_plan(cfg: Config, model: Transformer, groups: ParamGroups) -> Plan:
    """The plan for schedule.mode off or manual (auto goes through the planner)."""
    n_moe = sum(1 for _ in model.moe_layers())
    s = cfg.schedule
    if s.mode == "off":
        return Plan(chunks=(1,) * n_moe, dense_buckets=(len(groups.dense),) if groups.dense else (),
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


def workload(cfg: Config, dp: int, device: torch.device) -> Workload:
    """Shapes of one rank's step for this run."""
    per_rank = cfg.global_batch_sequences // dp
    micro = cfg.train.micro_batch_size or per_rank
    act_bytes = 2 if resolve_dtype(cfg.train.dtype, device) == torch.bfloat16 else 4
    return workload_for(cfg.model, tokens=micro * cfg.train.seq_len, seq_len=cfg.train.seq_len, ep=cfg.parallel.ep,
                        dp=dp, micro_steps=per_rank // micro, act_bytes=act_bytes,
                        frozen=frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen))


def profile_cache_dir() -> Path:
    return default_cache_root() / "profiles"


def _costs(cfg: Config, w: Workload, pmesh: ParallelMesh, device: torch.device) -> Costs:
    if cfg.schedule.hardware:
        return HardwareCosts(Hardware.load(cfg.schedule.hardware))
    profile, _ = load_or_measure(cfg.model, w, pmesh, device, resolve_dtype(cfg.train.dtype, device),
                                 profile_cache_dir())
    return MeasuredCosts(profile)


def plan_for(cfg: Config, model: Transformer, groups: ParamGroups, pmesh: ParallelMesh,
             device: torch.device) -> Plan:
    """off/manual: as configured (predicted too with schedule.predict). auto: measure and search."""
    if cfg.schedule.mode != "auto":
        plan = fixed_plan(cfg, model, groups)
        if not cfg.schedule.predict:
            return plan
        w = workload(cfg, pmesh.dp, device)
        return with_prediction(plan, predict(w, plan, _costs(cfg, w, pmesh, device)))
    w = workload(cfg, pmesh.dp, device)
    plan, _ = search(w, _costs(cfg, w, pmesh, device), cfg.schedule.grad_sync)
    return plan
