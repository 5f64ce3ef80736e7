"""The flat exchange: one row per (token, expert) copy over a group, plain or pipelined in chunks.

Rows arrive here already grouped by global expert (see models.moe.permutation).
Experts are laid out contiguously: rank r of the group owns experts [r*L, (r+1)*L) with
L = E / P, so the rows for rank r form one contiguous block.

Stages, each a function: `plan_exchange` (exchange counts, one collective and the
exchange's one host sync), `all_to_all` (rows out, autograd-aware), `local_expert_order`
(received rows are ordered by source rank; experts want them by expert), and the
reverse trip; `overlap.pipelined_experts` runs the same stages in overlapped chunks.

Shape legend (models/__init__.py): S rows sent (grouped by expert), C rows received (grouped by source
rank), D, E experts of the group, X local experts of a rank, P ranks in the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.parallel.exchange.all_to_all import all_to_all
from moeyard.parallel.exchange.overlap import ChunkSchedule, pipelined_experts
from moeyard.parallel.exchange.regroup import local_expert_order
from moeyard.parallel.lanes import lane_group


@dataclass(frozen=True)
class ExchangeLayout:
    """Split sizes of one all-to-all and how received rows map to local experts."""

    send_splits: list[int]
    """Rows sent to each rank of the ep group."""
    recv_splits: list[int]
    """Rows received from each rank of the ep group."""
    recv_counts_PX: Tensor
    """recv_counts_PX[p, l]: rows from rank p for local expert l (on the device)."""
    rows_per_local_expert: list[int]
    """Host copy of recv_counts_PX.sum(0), for the expert loop."""
    expert_rows: object = None
    """What the experts are told of their rows instead of counts (a machine's fan-out: hierarchical.NodeStage)."""

    def expert_counts(self, host: bool) -> object:
        """Rows per local expert where the experts read them: on the host (loop) or the device (grouped GEMM);
        or `expert_rows` where set."""
        if self.expert_rows is not None:
            return self.expert_rows
        return self.rows_per_local_expert if host else self.recv_counts_PX.sum(dim=0)


def plan_exchange(tokens_per_expert_E: Tensor, group: dist.ProcessGroup) -> ExchangeLayout:
    """Exchange per-expert row counts with the ep group (collective), then bring every split size to the
    host in one copy: the layer's only device-to-host synchronisation."""
    world = dist.get_world_size(group)
    recv_counts = torch.empty_like(tokens_per_expert_E)
    dist.all_to_all_single(recv_counts, tokens_per_expert_E.contiguous(), group=lane_group(group))
    send_PX = tokens_per_expert_E.view(world, -1)
    recv_counts_PX = recv_counts.view(world, -1)
    host = torch.cat([send_PX.sum(dim=1), recv_counts_PX.sum(dim=1), recv_counts_PX.sum(dim=0)]).cpu().tolist()
    return ExchangeLayout(
        send_splits=host[:world],
        recv_splits=host[world:2 * world],
        recv_counts_PX=recv_counts_PX,
        rows_per_local_expert=host[2 * world:],
    )


class Experts(Protocol):
    """What the exchange runs on the rows it received: GroupedExperts, or a machine's experts seen as one
    (hierarchical.MachineExperts)."""

    def __call__(self, x: Tensor, rows: object, order: Optional[Tensor] = None,
                 executor: Optional[Callable] = None) -> Tensor:
        """`rows`: what the experts are told of their rows (counts on the host or the device, or a machine's
        fan-out: hierarchical.NodeStage); `executor(forward_with, weights, x)`: run them another way, from the
        handed `x`."""
        ...

    def uses_grouped_mm(self, x: Tensor) -> bool: ...

    fp8_dispatch: bool
    """The rows travel to these experts as e4m3 bytes (train.fp8_dispatch; models/float8.py pack_rows)."""


RunExperts = Callable[..., Tensor]
"""(rows, rows per local expert, order=None) -> outputs in the rows' order."""


def plain_exchange(x_SD: Tensor, tokens_per_expert_E: Tensor, group: dist.ProcessGroup, run: RunExperts,
                   host_counts: bool, layout: Optional[ExchangeLayout] = None, fp8: bool = False) -> Tensor:
    """The unpipelined exchange: counts, rows out, `run` on the received rows, outputs back. `layout`: the
    counts exchanged already (hierarchical dispatch plans them with the rest of the layer's). `fp8`: the rows
    go out as e4m3 bytes, the outputs come back in their own dtype."""
    if dist.get_world_size(group) == 1:
        if layout is not None:
            return run(x_SD, layout.expert_counts(host_counts))
        return run(x_SD, tokens_per_expert_E.tolist() if host_counts else tokens_per_expert_E)
    layout = layout or plan_exchange(tokens_per_expert_E, group)
    x_CD = all_to_all(x_SD, layout.recv_splits, layout.send_splits, group, fp8)
    # Received rows are grouped by source rank; the experts regroup them by expert as they go.
    order = local_expert_order(layout.recv_counts_PX, x_CD.shape[0])
    y_CD = run(x_CD, layout.expert_counts(host_counts), order=order)
    return all_to_all(y_CD, layout.send_splits, layout.recv_splits, group)


def flat_exchange(x_SD: Tensor, tokens_per_expert_E: Tensor, experts: Experts, group: dist.ProcessGroup,
                  chunks: int, planned: ExchangeLayout | ChunkSchedule | None = None) -> Tensor:
    """Rows grouped by the group's experts -> the ranks owning them -> expert outputs back, same order;
    pipelined in `chunks` pieces when chunks > 1. `planned`: the split sizes, exchanged already (a layout for
    chunks = 1, a schedule otherwise)."""
    if dist.get_world_size(group) == 1:  # nothing planned comes here: hierarchical dispatch spans machines
        return experts(x_SD, tokens_per_expert_E)
    host_counts, fp8 = not experts.uses_grouped_mm(x_SD), experts.fp8_dispatch
    if chunks > 1:
        return experts(x_SD, tokens_per_expert_E, executor=lambda expert_fn, weights, x: pipelined_experts(
            x, tokens_per_expert_E, chunks, group, expert_fn, weights, host_counts, planned, fp8))
    return plain_exchange(x_SD, tokens_per_expert_E, group, experts, host_counts, planned, fp8)
