"""Fully sharded training state with torch's own FSDP2 (`fully_shard`), composed with expert parallelism.

Units, as torchtitan and Megatron-FSDP lay them out:
  - each MoE layer's routed experts: this rank's ep shard [E/ep, ...], sharded again over its edp group
    (the ranks that hold the same experts): on dim 0 (whole experts) where E/ep splits evenly over edp,
    else on the first dimension that does (each expert's hidden or model dimension, as torchtitan's
    `shard_placement_fn` does), so every rank holds the same bytes -- FSDP2's `torch.chunk` on dim 0
    would give 2 experts over edp 4 as 1, 1, 0, 0 and pad every rank to the largest;
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

from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moeyard.models import Transformer
from moeyard.models.moe.layer import MoE
from moeyard.models.mtp import MTPModule
from moeyard.models.transformer import HeldElsewhere
from moeyard.parallel.mesh import ParallelMesh
from moeyard.parallel.shards import expert_shard_dim


def mixed_precision(compute_dtype: torch.dtype, reduce_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `compute_dtype` from float32 master weights; reduce gradients in `reduce_dtype` (also
    under float32 compute: parallel.reduce_dtype=bfloat16 halves the reduce-scatter's bytes there too).
    Inputs are not cast: the residual stream stays float32 under autocast, as on every other layout (a unit
    casting its input would round it to bf16 at every block); the MoE layer sends its rows in bf16 itself."""
    return MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                reduce_dtype=None if reduce_dtype == compute_dtype else reduce_dtype,
                                cast_forward_inputs=False)


def apply_fsdp(model: Transformer, pmesh: ParallelMesh, reshard_after_forward: bool = True,
               policy: Optional[MixedPrecisionPolicy] = None) -> None:
    """Turn `model` (experts already sharded over ep) into FSDP units; its parameters become DTensors.

    Prefetch is explicit: each block's gather (its unit's and its experts') is issued when the previous
    block (or, in forward, the root) starts, so it is requested before the MoE layer's host sync blocks
    the CPU thread (FSDP2's implicit forward prefetch would wait for that sync; the overlap this buys has
    not been measured on a GPU), and the cost model charges this order. A rank holding several pipeline
    stages chains them within each stage, and its root, which every stage's forward enters, prefetches
    nothing (a stage's first block is gathered when it starts; the cost model still charges it as
    prefetched).

    Call after `apply_expert_parallel` and before building the optimizer."""
    policy = policy or MixedPrecisionPolicy()
    # Per stage this rank holds (one without pipeline stages), its blocks in forward order (an MTP depth
    # after the last stage's blocks), each as its own unit, then its experts'.
    part_of = {index: k for k, part in enumerate(model.held_parts) for index in part}
    parts: list[list[list[FSDPModule]]] = [[] for _ in model.held_parts]
    for index, unit in enumerate([*model.layers, *model.mtp]):  # an MTP depth is one unit: its norms, eh_proj and block
        if isinstance(unit, HeldElsewhere):  # another pipeline stage's block
            continue
        block = unit.block if isinstance(unit, MTPModule) else unit
        layer: list[FSDPModule] = []
        if isinstance(block.ffn, MoE):
            experts = fully_shard(block.ffn.experts, mesh=pmesh.edp_mesh, reshard_after_forward=reshard_after_forward,
                                  mp_policy=policy, shard_placement_fn=_even_expert_shards(pmesh.edp))
            experts.set_gradient_divide_factor(float(pmesh.dp))
            if pmesh.edp > 1:
                # A factor other than the mesh size is a PREMUL_SUM, which gloo lacks: sum, then divide. Not
                # on a mesh of one, where torch 2.13 would divide twice (once in place of the collective).
                experts.set_force_sum_reduction_for_comms(True)
            layer.append(experts)
        parts[part_of.get(index, len(parts) - 1)].append(
            [fully_shard(unit, mesh=pmesh.dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy),
             *layer])
    # The root's parameters are needed first in backward (output layer): keep them gathered after forward.
    root = fully_shard(model, mesh=pmesh.dp_mesh, reshard_after_forward=False, mp_policy=policy)
    # Prefetch within a stage only: the next block of another stage runs after other micro-batches' work,
    # by which time a backward has resharded what was gathered for it. Where the rank holds several
    # stages, every stage's forward enters the root, so it prefetches nothing.
    for layers in parts:
        chain = [[root], *layers] if len(parts) == 1 else layers
        for before, after in zip(chain, chain[1:]):
            before[0].set_modules_to_forward_prefetch(after)
        # Backward: each block prefetches the one below. Not the root: its pre-backward runs too late for the
        # last block (measured: every micro-step gathered that block and its experts twice).
        for before, after in zip(layers[::-1], layers[-2::-1]):
            before[0].set_modules_to_backward_prefetch(after)
    if len(parts) > 1:
        # Left unset, FSDP2 prefetches in backward the unit whose forward ended before the unit's own last
        # one; for the root, whose forward ends each stage's, that is the last block of whichever stage ran
        # forward last: another stage's, for another micro-batch, resharded again before it runs. FSDP2 has
        # no switch to turn that off: the root names itself, kept gathered through the step
        # (parallel/pipeline.py), so there is nothing to fetch.
        root.set_modules_to_backward_prefetch([root])


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered parameters (a no-op without FSDP). A forward without backward (an
    evaluation under no_grad) leaves the units that keep their parameters after forward gathered, as plain
    tensors in the module: call this before anything reads the parameters as the sharded DTensors."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_gather_once(model: nn.Module, last_micro_step: bool, reduce_once: bool = True) -> None:
    """Gather once per step: before each micro-step of a model whose units keep their parameters after
    forward (apply_fsdp with reshard_after_forward=False), keep them gathered after backward too and
    accumulate the unsharded gradients locally, except in the last, which reduce-scatters and reshards.
    One all-gather and one reduce-scatter per unit per step, at the memory of unsharded weights and
    gradients through the step. `reduce_once=False`: reduce-scatter in every micro-step (FSDP2 adds each
    into the float32 sharded gradient), so only the weights stay unsharded."""
    assert isinstance(model, FSDPModule), "set_gather_once needs the model apply_fsdp made"
    model.set_requires_gradient_sync(last_micro_step or not reduce_once)
    model.set_reshard_after_backward(last_micro_step)


def reduce_gathered(model: nn.Module) -> None:
    """Reduce-scatter and reshard, now, the unsharded gradients every unit of gathered-once `model` accumulated
    with its reduction held (begin_micro_step told each backward it was not the last): after a zero-bubble
    schedule whose weight steps added to them after the last input step. FSDP2 reduces only from its backward
    hooks; this runs what they run, as torch's own pipeline stage does for an FSDP module
    (`_PipelineStageBase.perform_reduce_grad`, torch 2.13): each parameter group's post-backward, then the
    root's final callback, which waits for the reductions."""
    assert isinstance(model, FSDPModule), "reduce_gathered needs the model apply_fsdp made"
    set_gather_once(model, last_micro_step=True)
    state = fully_shard.state(model)
    for unit in state._state_ctx.all_states:
        groups = unit._fsdp_param_groups if hasattr(unit, "_fsdp_param_groups") else [unit._fsdp_param_group]
        for group in groups:  # (one group, or None, a unit before torch 2.12)
            if group is not None:
                group.post_backward()
    state._root_post_backward_final_callback()


def _even_expert_shards(edp: int) -> Callable[[nn.Parameter], Shard]:
    def placement(p: nn.Parameter) -> Shard:
        return Shard(expert_shard_dim(p.shape, edp))
    return placement


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def global_expert_view(t: DTensor, pmesh: ParallelMesh) -> DTensor:
    """An FSDP expert parameter (or its gradient or AdamW moment) -- this rank's edp piece of its ep shard
    -- as a piece of the global [E, ...] tensor: `[Shard(0), Shard(d)]` on the (ep, edp) mesh, d the
    dimension FSDP shards it on. Shares storage with `t`, so loading into the view loads into `t`."""
    shape = (t.shape[0] * pmesh.ep, *t.shape[1:])
    return DTensor.from_local(t.to_local(), pmesh.experts_mesh, [Shard(0), t.placements[0]], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_strides(shape))
