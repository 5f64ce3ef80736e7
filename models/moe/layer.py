"""The MoE layer as a local computation: route, permute, run experts, unpermute.

Where the experts live is not this module's business: it hands the permuted
rows to `self.exchange`, which by default runs the local experts in place.
`moeyard.parallel.apply_expert_parallel` swaps in an exchange that sends rows
to the ranks owning their experts (all-to-all) and brings the results back.

Shape legend (models/__init__.py): B, T, N = B*T tokens, D, E experts, K experts per token, S kept token
copies grouped by expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from moeyard.models.config import MoEConfig
from moeyard.models.layers import SwiGLU
from moeyard.models.moe.expert_mlp import ExpertActivation
from moeyard.models.moe.experts import GroupedExperts
from moeyard.models.moe.permutation import Permutation, expert_capacity, permute, plan_permutation, unpermute
from moeyard.models.moe.routers import (
    Routing,
    balance_from_mean_probs,
    build_router,
    nodes_reached,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
)
from moeyard.models.weight_steps import Linear


class TokenExchange(Protocol):
    """Moves expert-sorted rows to their experts and back; owns every collective of the layer."""

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts) -> Tensor:
        """Expert outputs for rows grouped by (global) expert, in the same order."""
        ...

    def sum_over_batch(self, counts: Tensor) -> "PendingSum":
        """Sum of `counts` over every rank that holds part of the batch, launched, not waited for."""
        ...

    def run_routed(self, x_ND: Tensor, perm: Permutation, weight: Tensor, experts: GroupedExperts) -> Tensor:
        """Each token's sum of its experts' outputs weighted by `weight` (see `ExpertRows`)."""
        ...


class ExpertRows:
    """`run_routed` as permute -> run_experts -> unpermute: one row per (token, expert) copy travels and
    the weighted sum happens at home. An exchange that sums partial results on the way back (hierarchical
    dispatch) overrides it."""

    def run_routed(self, x_ND: Tensor, perm: Permutation, weight: Tensor, experts: GroupedExperts) -> Tensor:
        y_SD = self.run_experts(permute(x_ND, perm), perm.tokens_per_expert_E, experts)
        return unpermute(y_SD, perm, weight)


class PendingSum:
    """A sum over ranks that may still be in flight. `value` waits for it where it is first needed, after
    the layer's compute was queued (on a GPU the compute stream waits for the collective, not the host),
    so a layer's load statistics never hold the next layer back."""

    def __init__(self, tensor: Tensor, work: Any = None) -> None:
        self._tensor, self._work = tensor, work

    @property
    def value(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor


class LocalExchange(ExpertRows):
    """Single process: all experts are here, the batch is all here."""

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts) -> Tensor:
        # The counts stay a tensor: the grouped GEMM reads them on the device (no host sync), the CPU loop
        # reads them on the host.
        return experts(x_SD, tokens_per_expert_E)

    def sum_over_batch(self, counts: Tensor) -> PendingSum:
        return PendingSum(counts)


@dataclass
class MoEStats:
    """What one MoE layer reports for a micro-batch; load numbers cover the global batch and are read
    (waited for) only when asked for."""

    load: PendingSum
    """[routed copies per expert..., dropped, unrouted, skipped], summed over the batch's ranks (int64)."""
    balance: Callable[[Tensor], Tensor]
    """The load-balancing loss as a function of the global routed counts."""
    z_loss: Tensor
    """Unweighted router z-loss; has a gradient."""
    entropy: Tensor
    """Mean entropy of the router's distribution over experts, this rank's tokens (no gradient)."""
    nodes_per_token: Optional[Tensor] = None
    """Mean number of the model.moe.routing_nodes expert blocks a token's experts lie in, this rank's tokens;
    None without routing_nodes or for expert choice."""

    @classmethod
    def done(cls, tokens_per_expert_E: Tensor, dropped: Tensor, unrouted: Tensor, skipped: Tensor,
             aux_loss: Tensor, z_loss: Tensor, entropy: Tensor) -> "MoEStats":
        """Statistics whose numbers are already known."""
        load = torch.cat([tokens_per_expert_E, dropped.view(1), unrouted.view(1), skipped.view(1)])
        return cls(PendingSum(load), lambda _: aux_loss, z_loss, entropy)

    @property
    def tokens_per_expert_E(self) -> Tensor:
        """Token copies the router sent to each expert, summed over all ranks (int64)."""
        return self.load.value[:-3]

    @property
    def dropped(self) -> Tensor:
        """Copies dropped for capacity, summed over all ranks (int64)."""
        return self.load.value[-3]

    @property
    def unrouted(self) -> Tensor:
        """Tokens that reached no routed expert (all copies dropped, or no expert chose them), all ranks."""
        return self.load.value[-2]

    @property
    def skipped(self) -> Tensor:
        """Copies left out by expert skipping at evaluation (model.moe.skip_threshold), all ranks."""
        return self.load.value[-1]

    @cached_property
    def aux_loss(self) -> Tensor:
        """Unweighted load-balancing loss (1.0 is balanced); has a gradient."""
        return self.balance(self.tokens_per_expert_E)


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.ffn_dim, cfg.expert_compute,
                                      recompute="full" if cfg.recompute_experts else "none", bias=cfg.expert_bias,
                                      activation=ExpertActivation(cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit))
        self.shared_experts: Optional[SwiGLU] = (
            SwiGLU(dim, cfg.shared_hidden_dim) if cfg.num_shared_experts > 0 else None
        )
        self.shared_gate: Optional[nn.Linear] = Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.exchange: TokenExchange = LocalExchange()

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, MoEStats]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.router(x_BTD)
        perm = routing.permutation
        skipped = torch.zeros((), dtype=torch.int64, device=x_ND.device)
        if perm is None:
            capacity = None
            if self.cfg.capacity_factor is not None:
                k = routing.expert_index_NK.shape[1]  # dense_to_sparse changes k during its schedule
                capacity = expert_capacity(x_ND.shape[0], k, self.cfg.num_experts, self.cfg.capacity_factor)
            skip_NK = self._skipped_copies(routing.weight)
            perm = plan_permutation(routing.expert_index_NK, self.cfg.num_experts, capacity, skip_NK)
            if skip_NK is not None:
                skipped = skip_NK.sum()

        # One small collective, in flight while the experts run: global routed counts (for the aux loss and
        # metrics), drops, unrouted tokens, skipped copies.
        reached = torch.zeros(perm.num_tokens, dtype=torch.bool, device=x_ND.device)
        unrouted = perm.num_tokens - reached.index_fill_(0, perm.token_index_S, True).sum()
        load = self.exchange.sum_over_batch(torch.cat([perm.routed_per_expert_E, perm.dropped.view(1),
                                                       unrouted.view(1), skipped.view(1)]))

        x_rows_ND = x_ND
        if torch.is_autocast_enabled(x_ND.device.type):
            # Send rows in the compute dtype: half the all-to-all bytes of float32.
            x_rows_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        weight = routing.weight if self.cfg.route_scale == 1.0 else routing.weight * self.cfg.route_scale
        y_ND = self.exchange.run_routed(x_rows_ND, perm, weight, self.experts).to(x_ND.dtype)
        if self.shared_experts is not None:
            shared_ND = self.shared_experts(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(self.shared_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND
        stats = MoEStats(
            load=load,
            balance=self._balance_loss(routing, x_BTD.shape[:2]),
            z_loss=router_z_loss(routing.logits_NE),
            entropy=router_entropy(routing.probs_NE),
            nodes_per_token=self._nodes_per_token(routing),
        )
        return y_ND.view_as(x_BTD), stats

    def _nodes_per_token(self, routing: Routing) -> Optional[Tensor]:
        if not self.cfg.routing_nodes or routing.expert_index_NK is None:
            return None
        return nodes_reached(routing.expert_index_NK, self.cfg.num_experts, self.cfg.routing_nodes)

    def _skipped_copies(self, weight_NK: Tensor) -> Optional[Tensor]:
        """Expert skipping at evaluation: a token's second (and later) choices whose routing weight is below
        model.moe.skip_threshold; the other weights stay as they are. None while training or when off."""
        if self.training or self.cfg.skip_threshold <= 0 or weight_NK.shape[1] < 2:
            return None
        skip_NK = weight_NK < self.cfg.skip_threshold
        skip_NK[:, 0] = False  # never a token's first choice
        return skip_NK

    def _balance_loss(self, routing: Routing, batch_shape: torch.Size) -> Callable[[Tensor], Tensor]:
        """The balance loss as a function of the global routed counts, holding only what it needs (P_E, not
        the routing's [N, E] tensors): the statistics outlive the layer."""
        if routing.aux_loss is not None:
            aux = routing.aux_loss
        elif self.cfg.balance_loss == "sequence":
            B, S = batch_shape
            aux = sequence_balance_loss(routing.probs_NE.view(B, S, -1), routing.expert_index_NK.view(B, S, -1))
        else:
            mean_probs_E = routing.probs_NE.mean(dim=0)
            return lambda global_routed_E: balance_from_mean_probs(mean_probs_E, global_routed_E)
        return lambda _: aux
