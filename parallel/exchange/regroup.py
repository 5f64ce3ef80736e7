"""Reordering received rows between (source rank, expert) and (expert, source rank) order."""
from __future__ import annotations

import torch
from torch import Tensor


def local_expert_order(recv_counts_PX: Tensor, rows: int) -> Tensor:
    """Permutation that reorders received rows from (source rank, expert) to (expert, source rank).
    `rows` (the host's sum of the counts) fixes the output size: no wait for the device."""
    P, L = recv_counts_PX.shape
    expert_of_row_C = torch.arange(L, device=recv_counts_PX.device).repeat(P).repeat_interleave(
        recv_counts_PX.reshape(-1), output_size=rows
    )
    return torch.sort(expert_of_row_C, stable=True).indices


def inverse_permutation(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse
