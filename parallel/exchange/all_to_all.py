"""all_to_all_single as an autograd function: rows out with uneven splits, gradients back the same way; the rows
optionally as e4m3 bytes (train.fp8_dispatch), their gradients in their own dtype."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models.float8 import pack_rows, unpack_rows
from moeyard.parallel.lanes import lane_group, traced


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup, fp8: bool = False) -> Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        payload = pack_rows(x) if fp8 else x.contiguous()
        out = payload.new_empty((sum(recv_splits),) + tuple(payload.shape[1:]))
        with traced("a2a"):
            dist.all_to_all_single(out, payload, recv_splits, send_splits, group=lane_group(group))
        return unpack_rows(out, x.dtype) if fp8 else out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        with traced("a2a"):
            dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits,
                                   group=lane_group(ctx.group))
        return grad_in, None, None, None, None


def all_to_all(x: Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup,
               fp8: bool = False) -> Tensor:
    """`fp8`: rows [S, D] travel packed as e4m3 with their scales (models/float8.py pack_rows) and arrive in
    x's dtype; the backward's gradients travel in theirs (a straight-through trip, as the FP8 GEMMs'
    gradients)."""
    return _AllToAll.apply(x, recv_splits, send_splits, group, fp8)
