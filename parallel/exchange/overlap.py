"""Pipelined expert execution: all-to-all of one chunk overlaps expert compute of another.

The rows of every expert are cut into `r` near-equal parts; chunk c holds part c
of every expert. For each chunk the executor dispatches (all-to-all), computes
the local experts and combines (reverse all-to-all), with the collectives
launched asynchronously so that, at step c, the dispatch of chunk c+1 and the
combine of chunk c-1 travel while chunk c computes. Backward runs the same
pipeline in reverse order of data flow: gradients of chunk c+1 travel to the
experts while chunk c's expert backward runs, and input gradients of chunk c-1
travel home.

Expert rows are independent, so the result equals the unchunked path up to
float rounding of the weight-gradient sums.

On GPU, NCCL runs async collectives on its own stream; `work.wait()` makes the
compute stream wait on it with an event, and the process group records the
tensors on its stream, so no extra stream handling is needed here.

Shape legend (models/__init__.py): S rows sent (grouped by global expert), D, E global experts, X local
experts of a rank, P ranks in the ep group, I chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models.float8 import pack_rows, shared_weight_casts, unpack_rows
from moeyard.models.recompute import in_recomputed_block
from moeyard.parallel.exchange.regroup import inverse_permutation, local_expert_order
from moeyard.parallel.lanes import lane_group


@dataclass(frozen=True)
class ChunkSchedule:
    """Where each chunk's rows sit, and the split sizes of its two all-to-alls."""

    send_index: list[Tensor]
    """Per chunk: positions in the expert-grouped rows, grouped by expert."""
    send_splits: list[list[int]]
    recv_splits: list[list[int]]
    recv_order: list[Tensor]
    """Per chunk: permutation from (source rank, expert) to (expert, source rank) order."""
    rows_per_local_expert: list
    """Per chunk, what the experts are told of their rows: rows per local expert on the host (expert loop)
    or the device (grouped GEMM), or a machine's fan-out (hierarchical.NodeStage)."""

    @property
    def chunks(self) -> int:
        return len(self.send_index)


def chunk_rows(tokens_per_expert_E: Tensor, rows: int, chunks: int) -> tuple[Tensor, Tensor]:
    """Cut each expert's rows into `chunks` near-equal parts, on the device: the rows' order chunk-major
    (expert-grouped within a chunk), and rows per (chunk, expert) [I, E]. `rows`: their sum, on the host."""
    E = tokens_per_expert_E.numel()
    device = tokens_per_expert_E.device
    expert_of_row_S = torch.repeat_interleave(torch.arange(E, device=device), tokens_per_expert_E,
                                              output_size=rows)
    first_row_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    position_S = torch.arange(expert_of_row_S.numel(), device=device) - first_row_E[expert_of_row_S]
    chunk_of_row_S = part_of_position(position_S, tokens_per_expert_E[expert_of_row_S], chunks)
    counts_IE = torch.zeros(chunks, E, dtype=torch.int64, device=device)
    counts_IE.index_put_((chunk_of_row_S, expert_of_row_S), torch.ones_like(position_S), accumulate=True)
    return torch.sort(chunk_of_row_S, stable=True).indices, counts_IE


def part_of_position(position: Tensor, size: Tensor, chunks: int) -> Tensor:
    """Part c of a group of n rows is rows [c*n/C, (c+1)*n/C): sizes differ by at most one."""
    return torch.div(position * chunks, size.clamp(min=1), rounding_mode="floor")


def schedule_chunks(order_S: Tensor, send_host_PIX: Tensor, recv_PIX: Tensor, recv_host_PIX: Tensor,
                    expert_rows: list) -> ChunkSchedule:
    """The schedule from exchanged counts: rows in `order_S` (chunk-major), counts per (rank, chunk, local
    expert) sent (host) and received (device and host); `expert_rows` per chunk as the experts read them."""
    recv_splits = recv_host_PIX.sum(dim=2).t().tolist()
    return ChunkSchedule(
        send_index=list(order_S.split(send_host_PIX.sum(dim=(0, 2)).tolist())),
        send_splits=send_host_PIX.sum(dim=2).t().tolist(),
        recv_splits=recv_splits,
        recv_order=[local_expert_order(recv_PIX[:, c], sum(recv_splits[c])) for c in range(len(recv_splits))],
        rows_per_local_expert=expert_rows,
    )


def plan_chunks(tokens_per_expert_E: Tensor, rows: int, chunks: int, group: dist.ProcessGroup,
                host_counts: bool = True) -> ChunkSchedule:
    """Cut each expert's `rows` (summed over experts) into `chunks` parts and exchange the per-chunk counts
    (one collective, then one device-to-host copy of every split size)."""
    P = dist.get_world_size(group)
    E = tokens_per_expert_E.numel()
    order_S, counts_IE = chunk_rows(tokens_per_expert_E, rows, chunks)
    send_PIX = counts_IE.view(chunks, P, E // P).transpose(0, 1).contiguous()
    recv_PIX = torch.empty_like(send_PIX)
    dist.all_to_all_single(recv_PIX, send_PIX, group=lane_group(group))
    send_host, recv_host = torch.stack([send_PIX, recv_PIX]).cpu()  # one host sync for every split size below
    expert_rows = [recv_host[:, c].sum(dim=0).tolist() if host_counts else recv_PIX[:, c].sum(dim=0)
                   for c in range(chunks)]
    return schedule_chunks(order_S, send_host, recv_PIX, recv_host, expert_rows)


def _launch(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
            group: dist.ProcessGroup) -> dist.Work:
    return dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=lane_group(group), async_op=True)


ExpertFn = Callable[..., Tensor]


class _PipelinedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD: Tensor, schedule: ChunkSchedule, group: dist.ProcessGroup, expert_fn: ExpertFn,
                build_graph: bool, fp8: bool, *weights: Tensor) -> Tensor:
        C = schedule.chunks
        device = x_SD.device.type
        # Cast once for all chunks (under autocast the experts run in its dtype): one compute-dtype copy of
        # the weights is kept, not one per chunk (none where the block reruns). Gradients are summed over
        # chunks in float32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        weight_leaves = [w.detach().to(dtype or w.dtype).requires_grad_(w.requires_grad) for w in weights]
        payload = pack_rows(x_SD) if fp8 else x_SD  # train.fp8_dispatch: the rows travel as e4m3 bytes
        recv = [payload.new_empty(sum(schedule.recv_splits[c]), payload.shape[1]) for c in range(C)]
        sent = [payload.index_select(0, schedule.send_index[c]) for c in range(C)]
        back: list[Tensor] = []  # each chunk's outputs home, as wide as the experts' outputs
        dispatch = [_launch(recv[0], sent[0], schedule.recv_splits[0], schedule.send_splits[0], group)]
        combine = []
        graphs, kept_rows = [], []
        # In a block recomputed in backward, per-chunk graphs held here would outlive the checkpoint's drop
        # (every micro-batch in flight keeping its rows, outputs and weight copies): keep only the received rows,
        # through save_for_backward, and run the experts again in backward.
        rerun = build_graph and in_recomputed_block()
        with shared_weight_casts(weight_leaves):  # under train.fp8, the weights cast once for all chunks
            for c in range(C):
                dispatch[c].wait()
                if c + 1 < C:  # travels while chunk c computes
                    dispatch.append(_launch(recv[c + 1], sent[c + 1], schedule.recv_splits[c + 1],
                                            schedule.send_splits[c + 1], group))
                rows = unpack_rows(recv[c], x_SD.dtype) if fp8 else recv[c]
                x_in = rows.index_select(0, schedule.recv_order[c])
                if rerun:
                    kept_rows.append(x_in)
                    with torch.no_grad():
                        y_in = expert_fn(x_in, schedule.rows_per_local_expert[c], *weight_leaves)
                else:
                    x_in.requires_grad_(x_SD.requires_grad)
                    with torch.set_grad_enabled(build_graph):  # no per-chunk graphs in evaluation
                        y_in = expert_fn(x_in, schedule.rows_per_local_expert[c], *weight_leaves)
                    graphs.append((x_in, y_in))
                y_recv = y_in.detach().index_select(0, inverse_permutation(schedule.recv_order[c]))
                back.append(y_recv.new_empty(sent[c].shape[0], y_recv.shape[1]))
                combine.append(_launch(back[c], y_recv, schedule.send_splits[c], schedule.recv_splits[c], group))
        y_SD = x_SD.new_empty(x_SD.shape[0], back[0].shape[1], dtype=back[0].dtype)
        for c in range(C):
            combine[c].wait()
            y_SD[schedule.send_index[c]] = back[c]
        ctx.schedule, ctx.group, ctx.rerun = schedule, group, rerun
        if rerun:  # the weights themselves, cast again in backward (their casts would be a copy per micro-batch)
            ctx.save_for_backward(*kept_rows, *weights)
            ctx.expert_fn, ctx.x_requires_grad, ctx.cast_dtype = expert_fn, x_SD.requires_grad, dtype
            ctx.weights_require_grad = [w.requires_grad for w in weight_leaves]  # a recomputed one is detached
        else:
            ctx.graphs, ctx.weight_leaves = graphs, weight_leaves
        ctx.x_shape, ctx.x_dtype = x_SD.shape, x_SD.dtype
        ctx.weight_dtypes = [w.dtype for w in weights]
        return y_SD

    @staticmethod
    def backward(ctx, grad_y_SD: Tensor):
        schedule, group = ctx.schedule, ctx.group
        C = schedule.chunks
        grad_y_SD = grad_y_SD.contiguous()
        sent = [grad_y_SD.index_select(0, schedule.send_index[c]) for c in range(C)]
        recv = [grad_y_SD.new_empty(sum(schedule.recv_splits[c]), grad_y_SD.shape[1]) for c in range(C)]
        dispatch = [_launch(recv[0], sent[0], schedule.recv_splits[0], schedule.send_splits[0], group)]
        home, returns = [], []
        if ctx.rerun:  # the rows (recomputed with the block: detached), and the weights' leaves made again
            saved = ctx.saved_tensors
            weight_leaves = [w.detach().to(ctx.cast_dtype or w.dtype).requires_grad_(r)
                             for w, r in zip(saved[C:], ctx.weights_require_grad)]
        else:
            weight_leaves = ctx.weight_leaves
        grad_weights: list[Tensor | None] = [None] * len(weight_leaves)
        wanted = [w for w in weight_leaves if w.requires_grad]
        with shared_weight_casts(weight_leaves):  # the weights' other orientation, once for all chunks
            for c in range(C):
                dispatch[c].wait()
                if c + 1 < C:  # gradients of the next chunk travel while chunk c runs its expert backward
                    dispatch.append(_launch(recv[c + 1], sent[c + 1], schedule.recv_splits[c + 1],
                                            schedule.send_splits[c + 1], group))
                if ctx.rerun:
                    x_in = saved[c].detach().requires_grad_(ctx.x_requires_grad)
                    with torch.enable_grad():
                        y_in = ctx.expert_fn(x_in, schedule.rows_per_local_expert[c], *weight_leaves)
                else:
                    x_in, y_in = ctx.graphs[c]
                g_in = recv[c].index_select(0, schedule.recv_order[c]).to(y_in.dtype)
                inputs = ([x_in] if x_in.requires_grad else []) + wanted
                grads = list(torch.autograd.grad(y_in, inputs, g_in, allow_unused=True))
                gx_in = grads.pop(0) if x_in.requires_grad else torch.zeros_like(x_in)
                gx_in = torch.zeros_like(x_in) if gx_in is None else gx_in
                for i, w in enumerate(weight_leaves):
                    if w.requires_grad:
                        g = grads.pop(0)
                        if g is not None:
                            g = g.float()
                            grad_weights[i] = g if grad_weights[i] is None else grad_weights[i] + g
                gx_recv = gx_in.index_select(0, inverse_permutation(schedule.recv_order[c])).to(ctx.x_dtype)
                home.append(grad_y_SD.new_empty(sent[c].shape[0], gx_recv.shape[1], dtype=ctx.x_dtype))
                returns.append(_launch(home[c], gx_recv, schedule.send_splits[c], schedule.recv_splits[c], group))
        grad_x_SD = grad_y_SD.new_empty(ctx.x_shape, dtype=ctx.x_dtype)
        for c in range(C):
            returns[c].wait()
            grad_x_SD[schedule.send_index[c]] = home[c]
        ctx.graphs = ctx.expert_fn = None  # free the per-chunk graphs
        grad_weights = [g if g is None else g.to(dt) for g, dt in zip(grad_weights, ctx.weight_dtypes)]
        return (grad_x_SD, None, None, None, None, None, *grad_weights)


def pipelined_experts(x_SD: Tensor, tokens_per_expert_E: Tensor, chunks: int, group: dist.ProcessGroup,
                      expert_fn: ExpertFn, weights: tuple[Tensor, ...], host_counts: bool = True,
                      schedule: Optional[ChunkSchedule] = None, fp8: bool = False) -> Tensor:
    """Dispatch -> experts -> combine in `chunks` overlapped pieces; rows in and out grouped by global expert.
    `host_counts`: the experts read their row counts on the host (the loop), else on the device. `schedule`:
    planned already (hierarchical dispatch plans its chunks with the rest of the layer's counts). `fp8`: the
    rows are dispatched as e4m3 bytes (all_to_all's `fp8`)."""
    if schedule is None:
        schedule = plan_chunks(tokens_per_expert_E, x_SD.shape[0], chunks, group, host_counts)
    build_graph = torch.is_grad_enabled() and (x_SD.requires_grad or any(w.requires_grad for w in weights))
    return _PipelinedExperts.apply(x_SD, schedule, group, expert_fn, build_graph, fp8, *weights)
