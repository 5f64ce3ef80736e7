"""Hierarchical dispatch: a token crosses the network once per destination machine, then fans out inside it.

Flat dispatch sends one row per (token, expert) copy over the ep group, so a token whose k experts sit on
one other machine crosses the network k times. Here, as in DeepEP's internode kernels and Tutel's 2-D
all-to-all, in three steps:

1. cross: one row per (token, destination machine) goes to the rank with this rank's local index on that
   machine (the cross group), with its copies' metadata: which row, which of that machine's experts, and
   the routing weight;
2. node: that rank fans the rows out to the experts' ranks of its machine with the flat exchange over the
   node group (plain, or pipelined in the plan's chunks), the machine's experts only;
3. back: the expert outputs return inside the machine, are weighted and summed per (token, machine)
   there, and one partial sum per (token, machine) crosses back; home adds the machines' partial sums.

Every step is an autograd-aware collective or index operation, so backward takes the same route in
reverse: the gradient of a partial sum crosses once per (token, machine) too. Results equal the flat path
up to the order of float sums; partial sums travel in the rows' dtype (bf16 under autocast).

Shape legend: N tokens, S copies (grouped by global expert), U (token, machine) pairs sent, C copies
received, D model dim, M machines of the ep group, X experts per machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models.moe.permutation import Permutation, weighted_sum
from moeyard.parallel.exchange.all_to_all import all_to_all


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

    def add(self, rows: Tensor, row_bytes: int) -> None:
        rows = rows.detach().to(torch.int64)
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


RunExperts = Callable[[Tensor, Tensor], Tensor]
"""(rows grouped by the machine's experts, rows per expert of the machine) -> expert outputs, same order."""


def hierarchical_routed(x_ND: Tensor, perm: Permutation, weight: Tensor, groups: NodeGroups,
                        run_node_experts: RunExperts, traffic: Optional[CrossNodeTraffic] = None) -> Tensor:
    """Each token's weighted sum of its experts' outputs, a row crossing to each machine at most once."""
    M, N, D = groups.nodes, x_ND.shape[0], x_ND.shape[1]
    E = perm.tokens_per_expert_E.numel()
    X = E // M
    device = x_ND.device
    expert_S = torch.repeat_interleave(torch.arange(E, device=device), perm.tokens_per_expert_E,
                                       output_size=perm.token_index_S.numel())
    node_S = expert_S // X  # copies are grouped by expert, experts by machine: already grouped by machine
    pair_U, pair_of_copy_S = torch.unique(node_S * N + perm.token_index_S, sorted=True, return_inverse=True)
    pairs_M = torch.zeros(M, dtype=torch.int64, device=device).scatter_add_(0, pair_U // N,
                                                                            torch.ones_like(pair_U))
    copies_M = perm.tokens_per_expert_E.view(M, X).sum(dim=1)
    send_M2 = torch.stack([pairs_M, copies_M], dim=1)
    recv_M2 = torch.empty_like(send_M2)
    dist.all_to_all_single(recv_M2, send_M2, group=groups.cross_group)
    send_host, recv_host = torch.stack([send_M2, recv_M2]).cpu().tolist()  # the exchange's one host sync
    send_pairs, send_copies = [p for p, _ in send_host], [c for _, c in send_host]
    recv_pairs, recv_copies = [p for p, _ in recv_host], [c for _, c in recv_host]
    if traffic is not None:
        traffic.add(pairs_M.sum() - pairs_M[groups.node_index], D * x_ND.element_size())

    # 1. cross: a row per (token, machine), and per copy (row within its machine's block, expert there, weight).
    token_U = pair_U % N
    x_recv = all_to_all(x_ND.index_select(0, token_U), recv_pairs, send_pairs, groups.cross_group)
    first_pair_M = torch.cumsum(pairs_M, 0) - pairs_M
    meta_S2 = torch.stack([pair_of_copy_S - first_pair_M[node_S], expert_S - node_S * X], dim=1)
    meta_C2 = meta_S2.new_empty(sum(recv_copies), 2)
    dist.all_to_all_single(meta_C2, meta_S2, recv_copies, send_copies, group=groups.cross_group)
    weight_S = weight.reshape(-1).index_select(0, perm.copy_index_S)
    weight_C = all_to_all(weight_S, recv_copies, send_copies, groups.cross_group)

    # 2. node: the copies' rows, grouped by this machine's experts, through the flat exchange inside it.
    C = meta_C2.shape[0]
    source_C = torch.repeat_interleave(torch.arange(M, device=device),
                                       torch.tensor(recv_copies, device=device), output_size=C)
    recv_first_pair_M = torch.tensor([sum(recv_pairs[:m]) for m in range(M)], device=device, dtype=torch.int64)
    row_C = meta_C2[:, 0] + recv_first_pair_M[source_C]
    expert_C = meta_C2[:, 1]
    order_C = torch.sort(expert_C, stable=True).indices
    counts_X = torch.zeros(X, dtype=torch.int64, device=device).scatter_add_(0, expert_C, torch.ones_like(expert_C))
    row_C = row_C.index_select(0, order_C)
    y_C = run_node_experts(x_recv.index_select(0, row_C), counts_X)

    # 3. back: one weighted partial sum per (token, machine) crosses home, where the machines' sums add up.
    partial = weighted_sum(y_C, weight_C.index_select(0, order_C), row_C, x_recv.shape[0]).to(x_ND.dtype)
    y_U = all_to_all(partial, send_pairs, recv_pairs, groups.cross_group)
    dtype = torch.promote_types(y_U.dtype, torch.float32)
    return y_U.new_zeros(N, D, dtype=dtype).index_add(0, token_U, y_U.to(dtype))
