"""Fully sharded training state with torch's own FSDP2 (`fully_shard`), composed with expert parallelism.

Units, as torchtitan and Megatron-FSDP lay them out:
  - each MoE layer's routed experts: this rank's ep shard [E/ep, ...], sharded again on dim 0 over
    its edp group (the ranks that hold the same experts);
  - each transformer block (attention, norms, router, shared experts, dense FFN) and each MTP depth:
    sharded over dp;
  - the rest (embedding, final norm, output): the root unit, over dp.
Parameters are all-gathered before each unit's forward and backward and freed after; gradients are
reduce-scattered as each unit's backward ends, so a rank keeps 1/dp of the dense state and 1/world of
the experts' (ep * edp = world).

Gradient scale (see `parallel.grads.reduce`): every gradient is the dp-average. FSDP averages over
the unit's mesh, which for the dense units is dp; an expert unit's mesh is edp, so its divide factor
is set to dp explicitly, or expert gradients would be ep times too large.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moeyard.models import Transformer
from moeyard.models.moe.layer import MoE
from moeyard.models.mtp import MTPModule
from moeyard.parallel.mesh import ParallelMesh


def mixed_precision(compute_dtype: torch.dtype, reduce_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `compute_dtype` from float32 master weights; reduce gradients in `reduce_dtype`."""
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: Transformer, pmesh: ParallelMesh, reshard_after_forward: bool = True,
               policy: Optional[MixedPrecisionPolicy] = None) -> None:
    """Turn `model` (experts already sharded over ep) into FSDP units; its parameters become DTensors.

    Call after `apply_expert_parallel` and before building the optimizer."""
    policy = policy or MixedPrecisionPolicy()
    for unit in [*model.layers, *model.mtp]:  # an MTP depth is one unit: its norms, eh_proj and block
        block = unit.block if isinstance(unit, MTPModule) else unit
        if isinstance(block.ffn, MoE):
            experts = fully_shard(block.ffn.experts, mesh=pmesh.edp_mesh, reshard_after_forward=reshard_after_forward,
                                  mp_policy=policy)
            experts.set_gradient_divide_factor(float(pmesh.dp))
            if pmesh.edp > 1:
                # A factor other than the mesh size is a PREMUL_SUM, which gloo lacks: sum, then divide. Not
                # on a mesh of one, where torch 2.13 would divide twice (once in place of the collective).
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(unit, mesh=pmesh.dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root's parameters are needed first in backward (output layer): keep them gathered after forward.
    fully_shard(model, mesh=pmesh.dp_mesh, reshard_after_forward=False, mp_policy=policy)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def global_expert_view(t: DTensor, pmesh: ParallelMesh) -> DTensor:
    """An FSDP expert parameter (or its gradient or AdamW moment) -- this rank's edp piece of its ep shard
    -- as a piece of the global [E, ...] tensor: `[Shard(0), Shard(0)]` on the (ep, edp) mesh. Shares
    storage with `t`, so loading into the view loads into `t`."""
    shape = (t.shape[0] * pmesh.ep, *t.shape[1:])
    return DTensor.from_local(t.to_local(), pmesh.experts_mesh, [Shard(0), Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_strides(shape))
