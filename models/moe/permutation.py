"""Sorting token copies by expert, dropping over capacity, and putting them back.

Pure functions with explicit state: `plan_permutation` says where every copy
goes, `unpermute` uses that plan to weight and sum expert outputs per token.

Shape legend (models/__init__.py): N tokens, K experts per token, E experts, C token copies as routed
(C = N*K), S kept copies grouped by expert (S <= C), D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Permutation:
    """What `unpermute` needs to undo the sort; returned by the sort, never stored on a module."""

    token_index_S: Tensor
    """Source token of each kept copy, copies grouped by expert."""
    copy_index_S: Tensor
    """Flat index into the [N, K] routing tensors of each kept copy."""
    tokens_per_expert_E: Tensor
    """Kept copies per expert (int64), the row counts the experts compute."""
    routed_per_expert_E: Tensor
    """Copies the router sent to each expert, before any capacity drop (int64)."""
    num_tokens: int

    @property
    def dropped(self) -> Tensor:
        return self.routed_per_expert_E.sum() - self.tokens_per_expert_E.sum()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Most copies one expert accepts from one rank's tokens (GShard: per group)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_permutation(expert_index_NK: Tensor, num_experts: int, capacity: Optional[int],
                     skip_NK: Optional[Tensor] = None) -> Permutation:
    """Group copies by expert; with a capacity, keep the first `capacity` of each expert.

    Copies are ordered choice-major (every token's first choice before any second
    choice), then by token position, so a drop never costs a token its top
    expert while a lower-ranked copy of another token survives. Copies marked in
    `skip_NK` (expert skipping at evaluation) are left out as if never routed.
    """
    N, K = expert_index_NK.shape
    if skip_NK is not None:
        expert_index_NK = expert_index_NK.masked_fill(skip_NK, num_experts)  # past every expert: sorts last
    expert_of_copy_C = expert_index_NK.t().reshape(-1)  # choice-major: copy c = choice * N + token
    sorted_expert_C, order_C = torch.sort(expert_of_copy_C, stable=True)
    slots = num_experts + (skip_NK is not None)  # the skipped copies' sentinel counts apart
    routed_per_expert_E = torch.zeros(slots, dtype=torch.int64, device=expert_of_copy_C.device).scatter_add_(
        0, expert_of_copy_C, torch.ones_like(expert_of_copy_C))[:num_experts]  # bincount would sync on CUDA
    if skip_NK is not None:  # evaluation only: the host sync of the boolean index is fine there
        kept_C = sorted_expert_C < num_experts
        sorted_expert_C, order_C = sorted_expert_C[kept_C], order_C[kept_C]
    token_C = order_C % N
    choice_C = order_C // N
    if capacity is not None:
        group_start_E = torch.cumsum(routed_per_expert_E, 0) - routed_per_expert_E
        position_C = torch.arange(order_C.numel(), device=order_C.device) - group_start_E[sorted_expert_C]
        kept_C = (position_C < capacity).nonzero().squeeze(1)  # capacity's one host sync: how many are kept
        token_C, choice_C = token_C.index_select(0, kept_C), choice_C.index_select(0, kept_C)
        tokens_per_expert_E = routed_per_expert_E.clamp(max=capacity)
    else:
        tokens_per_expert_E = routed_per_expert_E
    return Permutation(
        token_index_S=token_C,
        copy_index_S=token_C * K + choice_C,
        tokens_per_expert_E=tokens_per_expert_E,
        routed_per_expert_E=routed_per_expert_E,
        num_tokens=N,
    )


def permute(x_ND: Tensor, perm: Permutation) -> Tensor:
    """Rows of the kept copies, grouped by expert."""
    return x_ND.index_select(0, perm.token_index_S)


def unpermute(y_SD: Tensor, perm: Permutation, weight: Tensor) -> Tensor:
    """Weight each copy's expert output by its router weight and sum into its token, in float32 (float64
    for float64 inputs).

    `weight` is indexed by `perm.copy_index_S` after flattening ([N, K] for token choice). A token whose
    copies were all dropped (or that no expert chose) gets zeros: the residual carries it.
    """
    weight_S = weight.reshape(-1).index_select(0, perm.copy_index_S)
    return weighted_sum(y_SD, weight_S, perm.token_index_S, perm.num_tokens)


def weighted_sum(y_SD: Tensor, weight_S: Tensor, index_S: Tensor, rows: int) -> Tensor:
    """out[index_S[s]] += weight_S[s] * y_SD[s] into `rows` rows, in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(y_SD.dtype, torch.float32)
    return _WeightedCombine.apply(y_SD, weight_S, index_S, rows, dtype)


class _WeightedCombine(torch.autograd.Function):
    """sum_s weight_s * y_s into its token, computed in `dtype`. Plain autograd would keep the float32 copy of
    the S x D rows for the weights' gradient; this keeps the rows in their own (bf16) dtype."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, weight_S: Tensor, token_index_S: Tensor, num_tokens: int,
                dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(y_SD, weight_S, token_index_S)
        ctx.dtype = dtype
        out_ND = y_SD.new_zeros(num_tokens, y_SD.shape[-1], dtype=dtype)
        return out_ND.index_add_(0, token_index_S, y_SD.to(dtype) * weight_S.to(dtype).unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        y_SD, weight_S, token_index_S = ctx.saved_tensors
        grad_SD = grad_ND.index_select(0, token_index_S)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad_SD * weight_S.to(ctx.dtype).unsqueeze(-1)).to(y_SD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_SD * y_SD.to(ctx.dtype)).sum(dim=-1).to(weight_S.dtype)
        return grad_y, grad_w, None, None, None
