"""all_to_all_single as an autograd function: rows out with uneven splits, gradients back the same way."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.parallel.lanes import lane_group, traced


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup) -> Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        with traced("a2a"):
            dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=lane_group(group))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        with traced("a2a"):
            dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits,
                                   group=lane_group(ctx.group))
        return grad_in, None, None, None


def all_to_all(x: Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    return _AllToAll.apply(x, recv_splits, send_splits, group)
