"""The MoE layer's exchange under expert parallelism: flat (`flat.py`) over the ep group, or hierarchical
(`hierarchical.py`) where the ep group spans machines, plus the layer's load-statistics sum.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch.distributed as dist
from torch import Tensor

from moeyard.models import GroupedExperts
from moeyard.models.float8 import packed_width
from moeyard.models.moe.layer import ExpertRows, PendingSum
from moeyard.models.moe.permutation import Permutation
from moeyard.parallel.exchange.flat import flat_exchange
from moeyard.parallel.exchange.hierarchical import (
    CrossNodeTraffic,
    NodeGroups,
    flat_cross_node_rows,
    hierarchical_routed,
)
from moeyard.parallel.lanes import lane_group

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
        pipelines the exchange across machines with each machine's fan-out and experts."""
        self.dispatch: Dispatch = dispatch
        self.node_groups = node_groups
        self.traffic = CrossNodeTraffic()
        """What this layer's dispatches sent off the machine (counted where the ep group spans machines)."""

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts) -> Tensor:
        if self.node_groups is not None:
            row_bytes = packed_width(x_SD.shape[1]) if experts.fp8_dispatch else x_SD.shape[1] * x_SD.element_size()
            self.traffic.add(flat_cross_node_rows(tokens_per_expert_E, self.node_groups), row_bytes)
        return flat_exchange(x_SD, tokens_per_expert_E, experts, self.ep_group, self.chunks)

    def run_routed(self, x_ND: Tensor, perm: Permutation, weight: Tensor, experts: GroupedExperts) -> Tensor:
        if self.dispatch == "flat" or self.node_groups is None:
            return super().run_routed(x_ND, perm, weight, experts)
        return hierarchical_routed(x_ND, perm, weight, self.node_groups, experts, self.chunks, self.traffic)

    def sum_over_batch(self, counts: Tensor) -> PendingSum:
        total = counts.clone()
        return PendingSum(total, dist.all_reduce(total, group=lane_group(self.batch_group), async_op=True))
