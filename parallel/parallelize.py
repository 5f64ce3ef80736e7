"""The one place where a Plan becomes running objects: expert shards, exchanges, gradient sync.

The model is a single-device `Transformer`; `parallelize` applies everything the
plan says from the outside, as torchtitan's `parallelize_*` functions do, and the
trainer only calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from moeyard.models import Transformer
from moeyard.models.meta_init import InitRecord
from moeyard.parallel.exchange.dispatch import ExpertParallelExchange
from moeyard.parallel.exchange.hierarchical import NodeGroups
from moeyard.parallel.fsdp import apply_fsdp, mixed_precision
from moeyard.parallel.grads.adamw import LowPrecisionMomentsAdamW
from moeyard.parallel.grads.buckets import BucketedReducer
from moeyard.parallel.grads.reduce import ParamGroups, split_parameters
from moeyard.parallel.grads.sync import FullyShardedSync, GradSync, OverlappedSync, PlainSync, ShardedSync
from moeyard.parallel.grads.zero import ShardedAdamW
from moeyard.parallel.materialize import materialize
from moeyard.parallel.mesh import ParallelMesh
from moeyard.parallel.plan import Plan


class AdamWSettings(Protocol):
    """The optimizer's hyperparameters (the trainer's `optim` config section has these fields)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    moment_dtype: str
    """float32 or bfloat16 (parallel/grads/adamw.py)."""


@dataclass(frozen=True)
class FsdpSettings:
    """How FSDP2 runs (the trainer fills it from `parallel.fsdp_*`, `parallel.reduce_dtype` and `train.dtype`);
    `reduce_dtype` is also what the other gradient reductions carry."""

    compute_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True


def apply_expert_parallel(model: Transformer, pmesh: ParallelMesh, chunks: Optional[tuple[int, ...]] = None,
                          dispatch: tuple[str, ...] = ()) -> None:
    """Keep this rank's slice of every expert weight (dim 0) and install the all-to-all exchange, pipelined
    in `chunks[i]` pieces in the i-th MoE layer (default: 1, the plain exchange), flat or hierarchical as
    `dispatch[i]` says (default: flat).

    Call before building the optimizer: expert parameters are replaced by their shard.
    """
    ordinal = plan_ordinals(model)
    chunks = chunks or (1,) * len(ordinal)
    dispatch = dispatch or ("flat",) * len(ordinal)
    if len(chunks) != len(ordinal) or len(dispatch) != len(ordinal):
        raise ValueError(f"the plan has chunks for {len(chunks)} and a dispatch for {len(dispatch)} MoE layers, "
                         f"the model has {len(ordinal)}")
    node_groups = None
    if pmesh.node_group is not None:
        node_groups = NodeGroups(pmesh.node_group, pmesh.cross_group)
    for layer, moe in model.moe_layers():
        r, how = chunks[ordinal[layer]], dispatch[ordinal[layer]]
        # Checked with the user's keys when the run config was resolved (trainer/config): here, asserted.
        num_experts = moe.cfg.num_experts
        assert num_experts % pmesh.ep == 0, f"MoE layer {layer}: {num_experts} experts over ep={pmesh.ep}"
        assert (moe.cfg.max_nodes_per_token is None or pmesh.ep_nodes == 1
                or moe.cfg.routing_nodes is not None and moe.cfg.routing_nodes % pmesh.ep_nodes == 0), \
            f"MoE layer {layer}: routing_nodes={moe.cfg.routing_nodes} straddles the {pmesh.ep_nodes} machines"
        local = num_experts // pmesh.ep
        start = pmesh.ep_rank * local
        experts = moe.experts
        for name, weight in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(weight.detach()[start:start + local].clone(),
                                                  requires_grad=weight.requires_grad))
        moe.exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks=r,
                                              dispatch="hierarchical" if how == "hierarchical" and node_groups
                                              else "flat", node_groups=node_groups)


def plan_ordinals(model: Transformer) -> dict[int, int]:
    """Block index -> position in the plan's per-MoE-layer tuples, which cover the whole model (a pipeline
    stage holds some of its MoE layers)."""
    cfg = model.cfg
    return {block: k for k, block in enumerate(i for i in range(cfg.n_blocks) if cfg.is_moe_layer(i))}


def reset_traffic(model: Transformer) -> None:
    """Count what crosses machines from here on (a step's, not the last evaluation's)."""
    for _, moe in model.moe_layers():
        if isinstance(moe.exchange, ExpertParallelExchange):
            moe.exchange.traffic.reset()


def take_cross_machine_bytes(model: Transformer, device: torch.device) -> dict[int, Tensor]:
    """Per MoE layer whose ep group spans machines: the bytes its exchange sent to other machines since the
    last reset (a tensor on `device`, summed by the caller with the step's statistics)."""
    return {layer: moe.exchange.traffic.take_bytes(device) for layer, moe in model.moe_layers()
            if isinstance(moe.exchange, ExpertParallelExchange) and moe.exchange.node_groups is not None}


def set_chunks(model: Transformer, chunks: tuple[int, ...]) -> None:
    """Change every MoE layer's pipeline degree between steps (the run's check of the plan does)."""
    ordinal = plan_ordinals(model)
    for layer, moe in model.moe_layers():
        if isinstance(moe.exchange, ExpertParallelExchange):
            moe.exchange.chunks = chunks[ordinal[layer]]


def adamw(model: nn.Module, settings: AdamWSettings) -> torch.optim.Optimizer:
    """torch's AdamW over the trainable parameters (LowPrecisionMomentsAdamW with bfloat16 moments); matrices
    decay (embeddings, projections, experts), norm gains, biases and sinks do not. Element-wise, so a sharded
    expert's update equals the unsharded one.

    Experts get groups of their own: under FSDP they are DTensors on another mesh than the dense
    parameters, and a foreach update cannot mix meshes."""
    groups = split_parameters(model)
    param_groups = [{"params": [p for p in params if id(p) not in groups.no_decay],
                     "weight_decay": settings.weight_decay} for params in (groups.dense, groups.expert)]
    for params in (groups.dense, groups.expert):  # norm gains and biases; per mesh, like the decayed ones
        param_groups.append({"params": [p for p in params if id(p) in groups.no_decay], "weight_decay": 0.0})
    param_groups = [g for g in param_groups if g["params"]]
    hyper = dict(lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)
    if settings.moment_dtype != "float32":
        return LowPrecisionMomentsAdamW(param_groups, **hyper, weight_decay=0.0,
                                        moment_dtype=getattr(torch, settings.moment_dtype))
    return torch.optim.AdamW(param_groups, **hyper)


def grad_sync_for(plan: Plan, model: nn.Module, groups: ParamGroups, pmesh: ParallelMesh,
                  settings: AdamWSettings, reduce_dtype: torch.dtype = torch.float32) -> GradSync:
    """The gradient reduction and optimizer the plan names, over the model's (sharded) parameters; the
    reduction's collectives carry `reduce_dtype`."""
    if plan.grad_sync == "reduce_scatter":
        reducer = BucketedReducer(groups, pmesh, plan.dense_buckets, plan.expert_buckets, "reduce_scatter",
                                  reduce_dtype)
        sharded = ShardedAdamW(reducer, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                               weight_decay=settings.weight_decay, no_decay=groups.no_decay,
                               moment_dtype=getattr(torch, settings.moment_dtype))
        return ShardedSync(groups, pmesh, reducer, sharded)
    optimizer = adamw(model, settings)
    if not plan.overlap_grads:
        return PlainSync(groups, pmesh, optimizer, reduce_dtype)
    return OverlappedSync(groups, pmesh, optimizer, BucketedReducer(groups, pmesh, plan.dense_buckets,
                                                                    plan.expert_buckets, "all_reduce", reduce_dtype))


def parallelize(model: Transformer, pmesh: ParallelMesh, plan: Plan, optim: AdamWSettings,
                device: torch.device, fsdp: Optional[FsdpSettings] = None,
                init: Optional[InitRecord] = None) -> GradSync:
    """Shard the experts over ep with each MoE layer's pipelined exchange, put this rank's part of the
    model on `device`, and build the gradient sync (buckets, reduction, optimizer) the plan says; with
    plan.grad_sync == "fsdp", FSDP2 units as `fsdp` says, gathered once per step where plan.gather_once.

    A model built on the meta device (`build_on_meta`) comes with its `init` record: it is sharded first
    and then allocated and initialised, this rank's part only."""
    apply_expert_parallel(model, pmesh, plan.chunks, plan.dispatch)
    if init is None:
        model.to(device)
    if plan.grad_sync == "fsdp":
        fsdp = fsdp or FsdpSettings()
        apply_fsdp(model, pmesh, fsdp.reshard_after_forward and not plan.gather_once,
                   mixed_precision(fsdp.compute_dtype, fsdp.reduce_dtype))
    if init is not None:
        materialize(model, init, pmesh, device)
    if plan.grad_sync == "fsdp":
        return FullyShardedSync(split_parameters(model), pmesh, adamw(model, optim),
                                gather_once_model=model if plan.gather_once else None,
                                reduce_once=plan.reduce_once_on(pmesh.pp_rank))
    return grad_sync_for(plan, model, split_parameters(model), pmesh, optim, (fsdp or FsdpSettings()).reduce_dtype)
