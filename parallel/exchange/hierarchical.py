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
ride in the packed rows' gradient). Results equal the flat path up to the order of float sums. Routing
weights and their gradients stay float32 in bf16 rows (three columns each, `weight_parts`); the partial
sums travel in the rows' dtype: each copy's output rounded once inside the machine's sum and the sum
rounded again for the trip home, where the flat path rounds each copy's output once.

Every split size of both stages is known before any row moves (`plan_pairs`: the sender counts each
machine's copies per expert, the cross peer sums its sources' counts for the node stage), and reaches the
host in one copy: one host sync per layer, as the flat exchange.

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
from moeyard.parallel.exchange.flat import ExchangeLayout, flat_exchange, plain_exchange
from moeyard.parallel.exchange.overlap import ChunkSchedule, part_of_position, schedule_chunks
from moeyard.parallel.lanes import lane_group


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


def weight_parts(row_dtype: torch.dtype) -> int:
    """Columns of the row dtype that carry one float32 routing weight: 1 in float32 or wider rows, 3 in bf16
    (hi + mid + lo: three 8-bit bf16 significands hold float32's 24 bits, and bf16 has float32's range).
    float16 has neither (train.dtype offers float32 and bfloat16 only)."""
    if torch.finfo(row_dtype).bits >= 32:
        return 1
    assert row_dtype == torch.bfloat16, f"hierarchical rows in {row_dtype}: float32 or bfloat16 only"
    return 3


class _SplitWeights(torch.autograd.Function):
    """[U, K] float32 weights -> [U, 3K] row-dtype parts that sum back to them exactly (bf16 rows), so that
    hierarchical dispatch carries routing weights in float32 inside half-precision rows. Its gradient comes
    back as parts too (`_JoinWeights.backward` splits it), and is joined here: exact both ways.

    The parts' own gradients are a split of the weights' gradient, not the gradient of each part: this holds
    because between the split and the join the parts only move (all-to-all, gathers, cat and slices), each
    used once. A part used twice would have its gradients summed in bf16, no longer exactly."""

    @staticmethod
    def forward(ctx, weight_UK: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.weight_dtype = weight_UK.dtype
        return _split(weight_UK.float(), dtype)

    @staticmethod
    def backward(ctx, grad_parts: Tensor):
        return _join(grad_parts).to(ctx.weight_dtype), None


class _JoinWeights(torch.autograd.Function):
    """Received parts -> float32 weights; their float32 gradient leaves as parts (see _SplitWeights)."""

    @staticmethod
    def forward(ctx, parts: Tensor) -> Tensor:
        ctx.dtype = parts.dtype
        return _join(parts)

    @staticmethod
    def backward(ctx, grad_UK: Tensor):
        return _split(grad_UK.float(), ctx.dtype)


def _split(w_UK: Tensor, dtype: torch.dtype) -> Tensor:
    hi = w_UK.to(dtype)
    rest = w_UK - hi.float()
    mid = rest.to(dtype)
    return torch.cat([hi, mid, (rest - mid.float()).to(dtype)], dim=1)


def _join(parts: Tensor) -> Tensor:
    return sum(part.float() for part in parts.chunk(3, dim=1))


def weights_as_columns(weight_UK: Tensor, dtype: torch.dtype) -> Tensor:
    """Routing weights as columns of rows in `dtype`, float32 exact (see weight_parts)."""
    if weight_parts(dtype) == 1:
        return weight_UK.to(dtype)
    return _SplitWeights.apply(weight_UK, dtype)


def weights_from_columns(columns: Tensor) -> Tensor:
    """The float32 (or wider) routing weights back from `weights_as_columns`' columns."""
    if weight_parts(columns.dtype) == 1:
        return columns
    return _JoinWeights.apply(columns)


@dataclass(frozen=True)
class NodeStage:
    """One chunk's fan-out inside the receiving machine, planned before the layer's one host sync: how many
    copies its received pair rows hold, and the node group's all-to-all of them."""

    copies: int
    layout: ExchangeLayout


@dataclass(frozen=True)
class PairPlan:
    """Where each (token, machine) pair goes, every split size of both stages on the host."""

    pair_of_copy_S: Tensor
    """Each kept copy's pair (pairs grouped by machine, tokens in order within one)."""
    key_S: Tensor
    """Each copy's machine * N + token."""
    expert_S: Tensor
    """Each copy's expert (copies grouped by expert)."""
    pairs: int
    """U: pairs this rank sends (host)."""
    pairs_M: Tensor
    """Pairs bound for each machine (device)."""
    cross: ExchangeLayout | ChunkSchedule
    """The cross group's exchange of pair rows: one layout (chunks = 1) or a chunk schedule."""


def plan_pairs(perm: Permutation, groups: NodeGroups, chunks: int) -> PairPlan:
    """Every count both stages need, on the device, exchanged over the cross group and then the node group,
    and brought to the host in one copy: the layer's only host sync (no `unique`, no `nonzero`).

    A pair's copies go to the cross peer on its machine, which fans them out to the machine's experts: the
    sender counts them per (chunk, expert) and the peer sums what its sources send before the node-group
    exchange, so the fan-out's split sizes are known before any row moves."""
    N, M = perm.num_tokens, groups.nodes
    E = perm.tokens_per_expert_E.numel()
    X, S = E // M, perm.token_index_S.numel()
    device = perm.token_index_S.device
    expert_S = torch.repeat_interleave(torch.arange(E, device=device), perm.tokens_per_expert_E, output_size=S)
    key_S = (expert_S // X) * N + perm.token_index_S  # copies are grouped by expert, so by machine
    exists_MN = torch.zeros(M * N, dtype=torch.int64, device=device).index_fill_(0, key_S, 1).view(M, N)
    # A pair's place among its machine's pairs (entries without a pair get 0: they count nowhere below).
    position_MN = (torch.cumsum(exists_MN, dim=1) - 1).clamp(min=0)
    pairs_M = exists_MN.sum(dim=1)
    pair_of_copy_S = ((torch.cumsum(pairs_M, 0) - pairs_M)[:, None] + position_MN).view(-1)[key_S]
    # Pair rows are cut into chunks per machine as the flat exchange cuts an expert's rows.
    chunk_MN = part_of_position(position_MN, pairs_M[:, None], chunks)
    chunk_S = chunk_MN.view(-1)[key_S]
    # Sent to machine m's peer, per chunk: its pairs, then its copies per expert of machine m.
    send_MI1 = torch.zeros(chunks, M, dtype=torch.int64, device=device).index_put_(
        (chunk_MN, torch.arange(M, device=device)[:, None].expand(M, N)), exists_MN, accumulate=True).t()
    copies_IE = torch.zeros(chunks, E, dtype=torch.int64, device=device).index_put_(
        (chunk_S, expert_S), torch.ones_like(expert_S), accumulate=True)
    send_MIY = torch.cat([send_MI1[..., None], copies_IE.view(chunks, M, X).transpose(0, 1)], dim=2).contiguous()
    recv_MIY = torch.empty_like(send_MIY)
    dist.all_to_all_single(recv_MIY, send_MIY, group=lane_group(groups.cross_group))
    # This rank fans its received copies out over its machine: rank g of the node group holds experts [gL, gL+L).
    G = dist.get_world_size(groups.node_group)
    node_send_GIL = recv_MIY[..., 1:].sum(dim=0).view(chunks, G, X // G).transpose(0, 1).contiguous()
    node_recv_GIL = node_send_GIL  # one rank per machine: the fan-out stays on this rank
    if G > 1:
        node_recv_GIL = torch.empty_like(node_send_GIL)
        dist.all_to_all_single(node_recv_GIL, node_send_GIL, group=lane_group(groups.node_group))
    send_h, recv_h, node_send_h, node_recv_h = _to_host(send_MIY, recv_MIY, node_send_GIL, node_recv_GIL)
    U = int(send_h[..., 0].sum())

    stages = []
    for c in range(chunks):
        node = ExchangeLayout(send_splits=node_send_h[:, c].sum(dim=1).tolist(),
                              recv_splits=node_recv_h[:, c].sum(dim=1).tolist(),
                              recv_counts_PX=node_recv_GIL[:, c],
                              rows_per_local_expert=node_recv_h[:, c].sum(dim=0).tolist())
        stages.append(NodeStage(int(node_send_h[:, c].sum()), node))
    if chunks == 1:
        cross: ExchangeLayout | ChunkSchedule = ExchangeLayout(
            send_splits=send_h[:, 0, 0].tolist(), recv_splits=recv_h[:, 0, 0].tolist(),
            recv_counts_PX=recv_MIY[:, 0, :1], rows_per_local_expert=recv_h[:, 0, :1].sum(dim=0).tolist(),
            expert_rows=stages[0])
    else:
        pair_chunk_U = torch.empty(U, dtype=torch.int64, device=device).scatter_(0, pair_of_copy_S, chunk_S)
        order_U = torch.sort(pair_chunk_U, stable=True).indices
        cross = schedule_chunks(order_U, send_h[..., :1], recv_MIY[..., :1], recv_h[..., :1], stages)
    return PairPlan(pair_of_copy_S, key_S, expert_S, U, pairs_M, cross)


def _to_host(*counts: Tensor) -> list[Tensor]:
    """Every count tensor in one device-to-host copy."""
    host = torch.cat([c.reshape(-1) for c in counts]).cpu()
    return [part.view(c.shape) for part, c in zip(host.split([c.numel() for c in counts]), counts)]


@dataclass(frozen=True)
class PairRows:
    """One row per (token, machine), grouped by machine, tokens in order within one."""

    x_UD: Tensor
    weight_UK: Tensor
    """The K slots' routing weights (float32; 0 in empty slots)."""
    ids_UK: Tensor
    """The machine's experts of each slot (int64; -1: no copy in that slot)."""
    token_U: Tensor

    @property
    def width(self) -> int:
        """K: the most copies a pair can have (top_k, or the machine's experts under expert choice)."""
        return self.ids_UK.shape[1]

    def packed(self, x_UD: Tensor) -> Tensor:
        """[U, D + (p + 1)K] in x_UD's dtype: `x_UD` (these rows as the experts module handed them on, perhaps
        cast), the weights in p columns each (weight_parts), the ids' raw bits."""
        ids_bits = self.ids_UK.to(ID_BITS[x_UD.element_size()]).view(x_UD.dtype)
        return torch.cat([x_UD, weights_as_columns(self.weight_UK, x_UD.dtype), ids_bits], dim=1)


def pair_rows(x_ND: Tensor, perm: Permutation, weight: Tensor, plan: PairPlan, nodes: int) -> PairRows:
    """The rows hierarchical dispatch sends: each token once to each machine holding one of its experts."""
    N = x_ND.shape[0]
    E = perm.tokens_per_expert_E.numel()
    X = E // nodes
    device = x_ND.device
    U, pair_of_copy_S = plan.pairs, plan.pair_of_copy_S
    key_U = torch.empty(U, dtype=torch.int64, device=device).scatter_(0, pair_of_copy_S, plan.key_S)
    expert_S = plan.expert_S
    # A copy's slot: its place among its pair's copies (at most top_k of them, or X under expert choice).
    width = min(weight.shape[-1], X) if weight.dim() == 2 else X
    by_pair = torch.sort(pair_of_copy_S, stable=True).indices
    copies_U = torch.zeros_like(key_U).scatter_add_(0, pair_of_copy_S, torch.ones_like(pair_of_copy_S))
    first_U = torch.cumsum(copies_U, 0) - copies_U
    slot_S = torch.empty_like(by_pair).index_copy_(
        0, by_pair, torch.arange(by_pair.numel(), device=device) - first_U[pair_of_copy_S[by_pair]])
    weight_S = weight.reshape(-1).index_select(0, perm.copy_index_S)
    weight_UK = weight_S.new_zeros(U, width).index_put((pair_of_copy_S, slot_S), weight_S)
    ids_UK = torch.full((U, width), -1, dtype=torch.int64, device=device).index_put_(
        (pair_of_copy_S, slot_S), expert_S % X)
    token_U = key_U % N
    return PairRows(x_ND.index_select(0, token_U), weight_UK, ids_UK, token_U)


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

    fp8_dispatch = False
    """Pair rows carry their copies' weights as columns: they travel in the compute dtype (train.fp8_dispatch
    is refused with hierarchical dispatch)."""

    def uses_grouped_mm(self, x: Tensor) -> bool:
        return False  # its rows are told as a NodeStage, planned on the host

    def __call__(self, x: Tensor, stage: NodeStage, order: Optional[Tensor] = None,
                 executor: Optional[Callable] = None) -> Tensor:
        if executor is not None:
            return executor(self.forward_with, self.weights, x)
        return self.forward_with(x, stage, *self.weights, order=order)

    def forward_with(self, packed_U: Tensor, stage: NodeStage, *weights: Tensor,
                     order: Optional[Tensor] = None) -> Tensor:
        """Partial sums [U, D] of received packed rows [U, D + (p + 1)K], in their order."""
        K, p = self.width, weight_parts(packed_U.dtype)
        D = packed_U.shape[1] - (p + 1) * K
        received_U = packed_U if order is None else packed_U.index_select(0, order)
        x_UD, weight_UK = received_U[:, :D], weights_from_columns(received_U[:, D:D + p * K])
        ids_UK = received_U[:, D + p * K:].detach().contiguous().view(ID_BITS[packed_U.element_size()]).to(torch.int64)
        copy_C = torch.nonzero_static((ids_UK >= 0).view(-1), size=stage.copies).squeeze(1)  # size planned: no sync
        expert_C = ids_UK.view(-1)[copy_C]
        by_expert = torch.sort(expert_C, stable=True).indices
        copy_C = copy_C[by_expert]
        row_C = copy_C // K

        def run(x: Tensor, counts: list[int] | Tensor, order: Optional[Tensor] = None) -> Tensor:
            return self.expert_fn(x, counts, *weights, order=order)

        y_CD = plain_exchange(x_UD.index_select(0, row_C), stage.layout.recv_counts_PX, self.node_group, run,
                              host_counts=not self.experts.uses_grouped_mm(x_UD), layout=stage.layout)
        partial_UD = weighted_sum(y_CD, weight_UK.reshape(-1)[copy_C], row_C, received_U.shape[0]).to(x_UD.dtype)
        return partial_UD if order is None else torch.empty_like(partial_UD).index_copy_(0, order, partial_UD)


def hierarchical_routed(x_ND: Tensor, perm: Permutation, weight: Tensor, groups: NodeGroups,
                        experts: GroupedExperts, chunks: int, traffic: Optional[CrossNodeTraffic] = None) -> Tensor:
    """Each token's weighted sum of its experts' outputs, a row crossing to each machine at most once; the
    network stage pipelined with the machines' work in `chunks` pieces."""
    plan = plan_pairs(perm, groups, chunks)
    pairs = pair_rows(x_ND, perm, weight, plan, groups.nodes)

    def exchange(expert_fn: Callable[..., Tensor], weights: tuple[Tensor, ...], x_UD: Tensor) -> Tensor:
        packed_U = pairs.packed(x_UD)
        if traffic is not None:
            traffic.add(plan.pairs_M.sum() - plan.pairs_M[groups.node_index], packed_U.shape[1] * packed_U.element_size())
        machine = MachineExperts(experts, expert_fn, weights, groups.node_group, pairs.width)
        return flat_exchange(packed_U, plan.pairs_M, machine, groups.cross_group, chunks, plan.cross)

    # Through the experts module with the token rows as its input (FSDP gathers the weights for the call
    # and reduce-scatters their gradients once this input's gradient is computed); the weights and ids join
    # them inside, in the dtype the rows travel in (FSDP's mixed precision may have cast them).
    y_UD = experts(pairs.x_UD, plan.pairs_M, executor=exchange)
    dtype = torch.promote_types(y_UD.dtype, torch.float32)
    return y_UD.new_zeros(x_ND.shape[0], x_ND.shape[1], dtype=dtype).index_add(0, pairs.token_U, y_UD.to(dtype))
