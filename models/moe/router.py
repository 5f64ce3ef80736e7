"""What every router returns, and the router losses.

Shape legend: B sequences, S positions, T = B*S tokens, D model dim, E experts,
K experts per token. Router logits are computed in float32 (float64 when the
input is float64, for gradcheck) whatever the autocast dtype: small logit
differences decide which expert a token goes to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from moeyard.models.moe.permutation import Permutation


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight."""

    weight: Tensor
    """Combine weights, indexed by the permutation's copy_index_S after flattening: [T, K] for token
    choice, [E, B, C] for expert choice."""
    probs_TE: Tensor
    """A distribution over experts per token, for the load-balancing loss and the router entropy."""
    logits_TE: Tensor
    """Raw logits, for the z-loss."""
    expert_index_TK: Optional[Tensor] = None
    """Token choice: int64 expert ids, best first; the MoE layer plans the permutation (and capacity)."""
    permutation: Optional[Permutation] = None
    """Expert choice: the router's own plan (experts picked their tokens)."""
    aux_loss: Optional[Tensor] = None
    """The router's own balance loss; None: the MoE layer computes the configured one."""


def router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def limit_to_best_blocks(score_TE: Tensor, blocks: int, keep: int, best_per_block: int) -> Tensor:
    """`score_TE` with every expert outside each token's `keep` best blocks of experts at -inf. Experts
    [i*E/blocks, (i+1)*E/blocks) form block i; a block scores the sum of its `best_per_block` best scores
    (DeepSeek-V3's group- and node-limited routing)."""
    T, E = score_TE.shape
    per_block = E // blocks
    score_TBX = score_TE.view(T, blocks, per_block)
    block_score_TB = score_TBX.topk(min(best_per_block, per_block), dim=-1).values.sum(dim=-1)
    best_TB = block_score_TB.topk(keep, dim=-1).indices
    allowed_TB = torch.zeros_like(block_score_TB, dtype=torch.bool).scatter_(1, best_TB, True)
    return score_TBX.masked_fill(~allowed_TB.unsqueeze(-1), float("-inf")).view(T, E)


class Router(nn.Module):
    """A linear scoring of tokens against experts; subclasses turn the logits into a Routing."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.node_limit: Optional[tuple[int, int]] = None
        """(routing_nodes, max_nodes_per_token) under node-limited routing; None: no limit."""

    def limit_nodes(self, score_TE: Tensor, k: int) -> Optional[Tensor]:
        """Node-limited routing: `score_TE` with experts outside each token's best max_nodes_per_token
        blocks at -inf, a block scored by the sum of its best ceil(k / M) scores; None when unlimited."""
        if self.node_limit is None:
            return None
        blocks, keep = self.node_limit
        return limit_to_best_blocks(score_TE, blocks, keep, -(-k // keep))

    def add_bias(self) -> None:
        """A learned bias on every logit (GPT-OSS's router; model.moe.router_bias)."""
        self.bias_E = nn.Parameter(torch.zeros(self.num_experts, dtype=self.weight_ED.dtype,
                                               device=self.weight_ED.device))

    def logits(self, x_TD: Tensor) -> Tensor:
        dtype = router_dtype(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.to(dtype) @ self.weight_ED.to(dtype).t()
            bias_E = getattr(self, "bias_E", None)
            return logits_TE if bias_E is None else logits_TE + bias_E.to(dtype)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Router state (expert biases, a schedule's position) starts at zero."""
        for buffer in self.buffers(recurse=False):
            buffer.zero_()

    def step_done(self, global_tokens_per_expert_E: Tensor) -> None:
        """Called after each optimizer step with the step's global load; routers with state update it."""

    def extra_metrics(self) -> dict[str, list[float]]:
        """Router state worth logging (e.g. expert biases)."""
        return {}


def load_balance_loss(probs_TE: Tensor, global_tokens_per_expert_E: Tensor) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e, normalised so perfect balance gives 1.

    f_e (fraction of routed token copies that chose e) comes from the *global*
    batch, P_e (mean router probability) from this rank's tokens. Averaging this
    value over data-parallel ranks (as gradient averaging does) gives exactly the
    loss of the whole global batch computed in one process.
    """
    return balance_from_mean_probs(probs_TE.mean(dim=0), global_tokens_per_expert_E)


def balance_from_mean_probs(mean_probs_E: Tensor, global_tokens_per_expert_E: Tensor) -> Tensor:
    """load_balance_loss from P_E alone: what a layer keeps while its global counts are in flight."""
    f_E = global_tokens_per_expert_E.to(mean_probs_E.dtype) / global_tokens_per_expert_E.sum().clamp(min=1)
    return mean_probs_E.shape[-1] * (f_E.detach() * mean_probs_E).sum()


def sequence_balance_loss(probs_BSE: Tensor, expert_index_BSK: Tensor) -> Tensor:
    """The same loss per sequence, averaged over sequences (DeepSeek-V3's sequence-wise balance loss):
    no expert may be starved or flooded *within* a sequence. Local to each sequence, so the same at any
    world size."""
    B, S, E = probs_BSE.shape
    K = expert_index_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, expert_index_BSK.reshape(B, S * K),
                           torch.ones(B, S * K, dtype=probs_BSE.dtype, device=probs_BSE.device))
    f_BE = counts_BE / (S * K)
    return E * (f_BE.detach() * probs_BSE.mean(dim=1)).sum(dim=-1).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token distribution over experts: log(E) is uniform, 0 is one-hot."""
    p = probs_TE.detach()
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1).mean()
