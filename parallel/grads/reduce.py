"""Gradient reduction and the global gradient norm under expert parallelism.

Scaling: each rank's loss is its share of the global-batch mean, scaled by dp
so that *averaging* over dp gives the global gradient. Dense gradients are
therefore summed over dp and divided by dp. An expert's gradient already sums
the contributions of every rank in its ep group (the all-to-all backward
brings them home); summing over its edp replicas then covers the whole batch
exactly once, so it too is divided by dp -- not by edp, which would make it ep
times too large.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeyard.models import copied_parameter_ids, expert_parameter_ids, no_decay_parameter_ids
from moeyard.parallel.mesh import ParallelMesh


@dataclass(frozen=True)
class ParamGroups:
    dense: list[nn.Parameter]
    """Replicated on every rank; reduced over dp."""
    expert: list[nn.Parameter]
    """This rank's expert shard; reduced over edp."""
    no_decay: frozenset[int] = frozenset()
    """ids of the parameters without weight decay (models.no_decay_parameter_ids)."""
    copied: frozenset[int] = frozenset()
    """ids of the parameters another pipeline stage holds too (models.copied_parameter_ids): left out of
    this stage's part of the gradient norm."""


def split_parameters(model: nn.Module) -> ParamGroups:
    expert_ids = expert_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return ParamGroups(
        dense=[p for p in params if id(p) not in expert_ids],
        expert=[p for p in params if id(p) in expert_ids],
        no_decay=frozenset(no_decay_parameter_ids(model)),
        copied=frozenset(copied_parameter_ids(model)),
    )


def _grads(params: list[nn.Parameter]) -> list[Tensor]:
    # A parameter that saw no rows (an expert shard that received no tokens) still
    # joins the collective, with zeros, or the ranks would disagree on buffer sizes.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _sum_and_scale(grads: list[Tensor], group: dist.ProcessGroup, scale: float,
                   dtype: torch.dtype = torch.float32) -> None:
    """One flat all-reduce (a single collective) in `dtype`, then copy back scaled."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_gradients(groups: ParamGroups, pmesh: ParallelMesh, dtype: torch.dtype = torch.float32) -> None:
    """Average every gradient over its replicas; the collectives carry `dtype` (parallel.reduce_dtype)."""
    scale = 1.0 / pmesh.dp
    _sum_and_scale(_grads(groups.dense), pmesh.dp_group, scale, dtype)
    _sum_and_scale(_grads(groups.expert), pmesh.edp_group, scale, dtype)


def squared_norm(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Sum of squares of all `tensors`, in float32: one fused multi-tensor kernel per dtype, not one
    reduction per tensor (hundreds of launches on a GPU)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """Multiply every tensor in place by the 0-dim `coef` (a clip coefficient), in fused kernels."""
    if tensors:
        torch._foreach_mul_(tensors, coef.to(tensors[0].device))


def norm_over_stages(sq: Tensor, pmesh: ParallelMesh) -> Tensor:
    """The whole model's L2 norm from this pipeline stage's sum of squares: stages hold disjoint
    parameters, so their sums add (the same number on every rank)."""
    if pmesh.pp_group is not None:
        dist.all_reduce(sq, group=pmesh.pp_group)
    return sq.sqrt()


def global_grad_norm(groups: ParamGroups, pmesh: ParallelMesh) -> Tensor:
    """L2 norm of the full model's gradient, as one process holding every expert would see it."""
    device = (groups.dense or groups.expert)[0].device
    dense_sq = squared_norm([g for p, g in zip(groups.dense, _grads(groups.dense)) if id(p) not in groups.copied],
                            device)
    expert_sq = squared_norm(_grads(groups.expert), device)
    # Expert shards within an ep group are disjoint; edp replicas are identical after reduction.
    dist.all_reduce(expert_sq, group=pmesh.ep_group)
    return norm_over_stages(dense_sq + expert_sq, pmesh)


def clip_gradients(groups: ParamGroups, total_norm: Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / norm), as torch.nn.utils.clip_grad_norm_ does."""
    if max_norm <= 0:
        return
    scale_(_grads(groups.dense) + _grads(groups.expert), (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
