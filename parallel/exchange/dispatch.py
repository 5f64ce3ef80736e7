"""Token exchange for expert parallelism: counts, all-to-all, local regrouping.

Rows arrive here already grouped by global expert (see models.moe.permutation).
Experts are laid out contiguously: ep rank r owns experts [r*L, (r+1)*L) with
L = E / ep, so the rows for rank r form one contiguous block.

Stages, each a function: `plan_exchange` (exchange counts, one collective and the
layer's one host sync), `all_to_all` (rows out, autograd-aware), `local_expert_order`
(received rows are ordered by source rank; experts want them by expert), and the
reverse trip; `overlap.pipelined_experts` runs the same stages in overlapped chunks.
`ExpertParallelExchange` composes them for the MoE layer, flat, or hierarchical (`hierarchical.py`) where
the ep group spans machines.

Shape legend: S rows sent, R rows received, D model dim, E global experts,
L local experts, P ranks in the ep group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models import GroupedExperts
from moeyard.models.moe.layer import ExpertRows, PendingSum
from moeyard.models.moe.permutation import Permutation
from moeyard.parallel.exchange.all_to_all import all_to_all
from moeyard.parallel.exchange.hierarchical import (
    CrossNodeTraffic,
    NodeGroups,
    flat_cross_node_rows,
    hierarchical_routed,
)
from moeyard.parallel.exchange.overlap import pipelined_experts
from moeyard.parallel.exchange.regroup import local_expert_order


@dataclass(frozen=True)
class ExchangeLayout:
    """Split sizes of one all-to-all and how received rows map to local experts."""

    send_splits: list[int]
    """Rows sent to each rank of the ep group."""
    recv_splits: list[int]
    """Rows received from each rank of the ep group."""
    recv_counts_PL: Tensor
    """recv_counts_PL[p, l]: rows from rank p for local expert l (on the device)."""
    rows_per_local_expert: list[int]
    """Host copy of recv_counts_PL.sum(0), for the expert loop."""

    def expert_counts(self, host: bool) -> list[int] | Tensor:
        """Rows per local expert where the experts read them: on the host (loop) or the device (grouped GEMM)."""
        return self.rows_per_local_expert if host else self.recv_counts_PL.sum(dim=0)


def plan_exchange(tokens_per_expert_E: Tensor, group: dist.ProcessGroup) -> ExchangeLayout:
    """Exchange per-expert row counts with the ep group (collective), then bring every split size to the
    host in one copy: the layer's only device-to-host synchronisation."""
    world = dist.get_world_size(group)
    recv_counts = torch.empty_like(tokens_per_expert_E)
    dist.all_to_all_single(recv_counts, tokens_per_expert_E.contiguous(), group=group)
    send_PL = tokens_per_expert_E.view(world, -1)
    recv_counts_PL = recv_counts.view(world, -1)
    host = torch.cat([send_PL.sum(dim=1), recv_counts_PL.sum(dim=1), recv_counts_PL.sum(dim=0)]).cpu().tolist()
    return ExchangeLayout(
        send_splits=host[:world],
        recv_splits=host[world:2 * world],
        recv_counts_PL=recv_counts_PL,
        rows_per_local_expert=host[2 * world:],
    )


def flat_exchange(x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts, group: dist.ProcessGroup,
                  chunks: int) -> Tensor:
    """Rows grouped by the group's experts -> the ranks owning them -> expert outputs back, same order;
    pipelined in `chunks` pieces when chunks > 1."""
    if dist.get_world_size(group) == 1:
        return experts(x_SD, tokens_per_expert_E)
    host_counts = not experts.uses_grouped_mm(x_SD)
    if chunks > 1:
        return experts(x_SD, tokens_per_expert_E, executor=lambda expert_fn, weights: pipelined_experts(
            x_SD, tokens_per_expert_E, chunks, group, expert_fn, weights, host_counts))
    layout = plan_exchange(tokens_per_expert_E, group)
    x_RD = all_to_all(x_SD, layout.recv_splits, layout.send_splits, group)
    # Received rows are grouped by source rank; the experts regroup them by expert as they go.
    order = local_expert_order(layout.recv_counts_PL, x_RD.shape[0])
    y_RD = experts(x_RD, layout.expert_counts(host_counts), order=order)
    return all_to_all(y_RD, layout.send_splits, layout.recv_splits, group)


Dispatch = Literal["flat", "hierarchical"]


class ExpertParallelExchange(ExpertRows):
    """Runs a layer's experts across the ep group; installed by `apply_expert_parallel`."""

    def __init__(self, ep_group: dist.ProcessGroup, batch_group: dist.ProcessGroup, chunks: int = 1,
                 dispatch: Dispatch = "flat", node_groups: Optional[NodeGroups] = None) -> None:
        if dispatch == "hierarchical" and node_groups is None:
            raise ValueError("hierarchical dispatch needs an ep group that spans machines (node_groups)")
        self.ep_group = ep_group
        self.batch_group = batch_group
        self.ep = dist.get_world_size(ep_group)
        self.chunks = chunks
        """Pipeline degree r from the plan; 1 is the plain reference path. Under hierarchical dispatch it
        pipelines the exchange inside each machine with the experts."""
        self.dispatch: Dispatch = dispatch
        self.node_groups = node_groups
        self.traffic = CrossNodeTraffic()
        """What this layer's dispatches sent off the machine (counted where the ep group spans machines)."""

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts) -> Tensor:
        if self.node_groups is not None:
            self.traffic.add(flat_cross_node_rows(tokens_per_expert_E, self.node_groups),
                             x_SD.shape[1] * x_SD.element_size())
        return flat_exchange(x_SD, tokens_per_expert_E, experts, self.ep_group, self.chunks)

    def run_routed(self, x_ND: Tensor, perm: Permutation, weight: Tensor, experts: GroupedExperts) -> Tensor:
        if self.dispatch == "flat" or self.node_groups is None:
            return super().run_routed(x_ND, perm, weight, experts)
        node_group = self.node_groups.node_group
        return hierarchical_routed(
            x_ND, perm, weight, self.node_groups,
            lambda x_CD, counts_X: flat_exchange(x_CD, counts_X, experts, node_group, self.chunks), self.traffic)

    def sum_over_batch(self, counts: Tensor) -> PendingSum:
        total = counts.clone()
        return PendingSum(total, dist.all_reduce(total, group=self.batch_group, async_op=True))
