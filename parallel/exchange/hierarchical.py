"""Hierarchical dispatch: a token crosses the network once per destination machine, then fans out inside it.

Flat dispatch sends one row per (token, expert) copy over the ep group, so a token whose k experts sit on
one other machine crosses the network k times. Here, as in DeepEP's internode kernels and Tutel's 2-D
all-to-all:

1. cross: one row per (token, destination machine) goes to the rank with this rank's local index on that
   machine (the cross group), packed with its copies' routing weights and expert ids (K of each, K the
   most copies a pair can have: top_k, or the machine's experts);
2. node: that rank fans the copies out to the experts' ranks of its machine over the node group, and
   weights and sums each pair's expert outputs there;
3. back: one partial sum per (token, machine) crosses home, where the machines' sums add up.

Seen from the cross group a machine is one "expert" per rank (`MachineExperts`), so the flat exchange
carries steps 1 and 3, plain or pipelined in the plan's chunks: the network stage of one chunk travels
while another chunk fans out and computes. Every step is autograd-aware, so backward takes the same route
in reverse (a partial sum's gradient crosses once per (token, machine), the routing weights' gradients
ride in the packed rows' gradient). Results equal the flat path up to the order of float sums; under
autocast the weights and partial sums travel in the rows' dtype (bf16).

Shape legend (models/__init__.py): N tokens, S copies (grouped by global expert), U (token, machine) pairs
(sent, or received), K a pair's copy slots, C copies received, D, M machines of the ep group, X experts per
machine.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models import GroupedExperts
from moeyard.models.moe.permutation import Permutation, weighted_sum
from moeyard.parallel.exchange.flat import flat_exchange, plain_exchange


@dataclass(frozen=True)
class NodeGroups:
    """How an ep group that spans machines is cut: this rank's machine, and its peers on the others."""

    node_group: dist.ProcessGroup
    """The ep group's ranks on this rank's machine."""
    cross_group: dist.ProcessGroup
    """One rank per machine of the ep group: those with this rank's local index, in machine order."""

    @property
    def nodes(self) -> int:
        return dist.get_world_size(self.cross_group)

    @property
    def node_index(self) -> int:
        """This rank's machine within its ep group."""
        return dist.get_rank(self.cross_group)


class CrossNodeTraffic:
    """Rows and bytes this rank's dispatches sent to other machines, summed on the device (no host sync
    until read). The combine sends as many back; backward repeats both."""

    def __init__(self) -> None:
        self._rows: Optional[Tensor] = None
        self._bytes: Optional[Tensor] = None
        self._lock = threading.Lock()  # overlapped_1f1b's two lanes both add (parallel/lanes.py)

    def add(self, rows: Tensor, row_bytes: int) -> None:
        rows = rows.detach().to(torch.int64)
        with self._lock:
            self._rows = rows if self._rows is None else self._rows + rows
            self._bytes = rows * row_bytes if self._bytes is None else self._bytes + rows * row_bytes

    def take_bytes(self, device: torch.device) -> Tensor:
        """Bytes so far as a device tensor (no host sync), and start counting again."""
        taken = torch.zeros((), dtype=torch.int64, device=device) if self._bytes is None else self._bytes
        self.reset()
        return taken

    def read(self) -> tuple[int, int]:
        """(rows, bytes) so far."""
        return (0, 0) if self._rows is None else (int(self._rows), int(self._bytes))

    def reset(self) -> None:
        self._rows = self._bytes = None


def flat_cross_node_rows(tokens_per_expert_E: Tensor, groups: NodeGroups) -> Tensor:
    """Copies the flat exchange sends off this machine: every row whose expert lives on another one."""
    per_node_M = tokens_per_expert_E.view(groups.nodes, -1).sum(dim=1)
    return per_node_M.sum() - per_node_M[groups.node_index]


ID_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer type of a row dtype's width: expert ids ride in the rows as raw bits, never as float values."""


@dataclass(frozen=True)
class PairRows:
    """One row per (token, machine), grouped by machine, tokens in order within one."""

    values_U: Tensor
    """[U, D + K]: x, then the K slots' routing weights; the weights of empty slots are 0."""
    ids_UK: Tensor
    """The machine's experts of each slot (int64; -1: no copy in that slot)."""
    token_U: Tensor
    pairs_M: Tensor
    """Rows bound for each machine."""

    @property
    def width(self) -> int:
        """K: the most copies a pair can have (top_k, or the machine's experts under expert choice)."""
        return self.ids_UK.shape[1]

    def packed(self, values_U: Tensor) -> Tensor:
        """`values_U` (these values as the experts module handed them on) with the ids' raw bits beside."""
        ids_bits = self.ids_UK.to(ID_BITS[values_U.element_size()]).view(values_U.dtype)
        return torch.cat([values_U, ids_bits], dim=1)


def pair_rows(x_ND: Tensor, perm: Permutation, weight: Tensor, nodes: int) -> PairRows:
    """The rows hierarchical dispatch sends: each token once to each machine holding one of its experts."""
    N = x_ND.shape[0]
    E = perm.tokens_per_expert_E.numel()
    X = E // nodes
    device = x_ND.device
    expert_S = torch.repeat_interleave(torch.arange(E, device=device), perm.tokens_per_expert_E,
                                       output_size=perm.token_index_S.numel())
    node_S = expert_S // X  # copies are grouped by expert, experts by machine: already grouped by machine
    pair_U, pair_of_copy_S = torch.unique(node_S * N + perm.token_index_S, sorted=True, return_inverse=True)
    pairs_M = torch.zeros(nodes, dtype=torch.int64, device=device).scatter_add_(0, pair_U // N,
                                                                                torch.ones_like(pair_U))
    # A copy's slot: its place among its pair's copies (at most top_k of them, or X under expert choice).
    width = min(weight.shape[-1], X) if weight.dim() == 2 else X
    by_pair = torch.sort(pair_of_copy_S, stable=True).indices
    copies_U = torch.zeros_like(pair_U).scatter_add_(0, pair_of_copy_S, torch.ones_like(pair_of_copy_S))
    first_U = torch.cumsum(copies_U, 0) - copies_U
    slot_S = torch.empty_like(by_pair).index_copy_(
        0, by_pair, torch.arange(by_pair.numel(), device=device) - first_U[pair_of_copy_S[by_pair]])
    weight_S = weight.reshape(-1).index_select(0, perm.copy_index_S)
    U = pair_U.numel()
    weight_UK = weight_S.new_zeros(U, width).index_put((pair_of_copy_S, slot_S), weight_S)
    ids_UK = torch.full((U, width), -1, dtype=torch.int64, device=device).index_put_(
        (pair_of_copy_S, slot_S), expert_S - node_S * X)
    token_U = pair_U % N
    values_U = torch.cat([x_ND.index_select(0, token_U), weight_UK.to(x_ND.dtype)], dim=1)
    return PairRows(values_U, ids_UK, token_U, pairs_M)


class MachineExperts:
    """A machine's experts seen from the cross group as one "expert" per rank: the flat exchange (plain or
    pipelined) sends it packed pair rows, and it fans them out to the machine's experts over the node
    group, weights and sums each pair's copies there, and returns one partial sum per pair row.
    `expert_fn(x, rows per expert, *weights, order=None)` and `weights` are the local experts' function and
    (gathered, under FSDP) weights, as GroupedExperts hands them to an executor."""

    def __init__(self, experts: GroupedExperts, expert_fn: Callable[..., Tensor], weights: tuple[Tensor, ...],
                 node_group: dist.ProcessGroup, width: int) -> None:
        self.experts, self.expert_fn, self.weights = experts, expert_fn, weights
        self.node_group, self.width = node_group, width

    def uses_grouped_mm(self, x: Tensor) -> bool:
        return False  # one "expert" per rank: its row count is read on the host

    def __call__(self, x: Tensor, rows: list[int] | Tensor, order: Optional[Tensor] = None,
                 executor: Optional[Callable] = None) -> Tensor:
        if executor is not None:
            return executor(self.forward_with, self.weights, x)
        return self.forward_with(x, rows, *self.weights, order=order)

    def forward_with(self, packed_U: Tensor, rows: list[int] | Tensor, *weights: Tensor,
                     order: Optional[Tensor] = None) -> Tensor:
        """Partial sums [U, D] of received packed rows [U, D + 2K], in their order."""
        K = self.width
        D = packed_U.shape[1] - 2 * K
        received_U = packed_U if order is None else packed_U.index_select(0, order)
        x_UD, weight_UK = received_U[:, :D], received_U[:, D:D + K]
        ids_UK = received_U[:, D + K:].detach().contiguous().view(ID_BITS[packed_U.element_size()]).to(torch.int64)
        row_C, slot_C = (ids_UK >= 0).nonzero(as_tuple=True)  # one host sync: the copies of these pairs
        expert_C = ids_UK[row_C, slot_C]
        by_expert = torch.sort(expert_C, stable=True).indices
        row_C, slot_C, expert_C = row_C[by_expert], slot_C[by_expert], expert_C[by_expert]
        X = self.experts.num_local_experts * dist.get_world_size(self.node_group)
        counts_X = torch.zeros(X, dtype=torch.int64, device=packed_U.device).scatter_add_(
            0, expert_C, torch.ones_like(expert_C))

        def run(x: Tensor, counts: list[int] | Tensor, order: Optional[Tensor] = None) -> Tensor:
            return self.expert_fn(x, counts, *weights, order=order)

        y_CD = plain_exchange(x_UD.index_select(0, row_C), counts_X, self.node_group, run,
                              host_counts=not self.experts.uses_grouped_mm(x_UD))
        partial_UD = weighted_sum(y_CD, weight_UK[row_C, slot_C], row_C, received_U.shape[0]).to(x_UD.dtype)
        return partial_UD if order is None else torch.empty_like(partial_UD).index_copy_(0, order, partial_UD)


def hierarchical_routed(x_ND: Tensor, perm: Permutation, weight: Tensor, groups: NodeGroups,
                        experts: GroupedExperts, chunks: int, traffic: Optional[CrossNodeTraffic] = None) -> Tensor:
    """Each token's weighted sum of its experts' outputs, a row crossing to each machine at most once; the
    network stage pipelined with the machines' work in `chunks` pieces."""
    pairs = pair_rows(x_ND, perm, weight, groups.nodes)
    if traffic is not None:
        row_bytes = (pairs.values_U.shape[1] + pairs.width) * pairs.values_U.element_size()
        traffic.add(pairs.pairs_M.sum() - pairs.pairs_M[groups.node_index], row_bytes)

    def exchange(expert_fn: Callable[..., Tensor], weights: tuple[Tensor, ...], values_U: Tensor) -> Tensor:
        machine = MachineExperts(experts, expert_fn, weights, groups.node_group, pairs.width)
        return flat_exchange(pairs.packed(values_U), pairs.pairs_M, machine, groups.cross_group, chunks)

    # Through the experts module with the float values as its input (FSDP gathers the weights for the call
    # and reduce-scatters their gradients once this input's gradient is computed); the ids join them inside,
    # out of reach of a mixed-precision cast of the module's inputs.
    y_UD = experts(pairs.values_U, pairs.pairs_M, executor=exchange)
    dtype = torch.promote_types(y_UD.dtype, torch.float32)
    return y_UD.new_zeros(x_ND.shape[0], x_ND.shape[1], dtype=dtype).index_add(0, pairs.token_U, y_UD.to(dtype))
