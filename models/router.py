"""Top-k softmax router (Mixtral / GShard) and the router losses.

Shape legend: T tokens, D model dim, E experts, K experts per token.
Router logits are computed in float32 whatever the autocast dtype: small logit
differences decide which expert a token goes to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight."""

    expert_index_TK: Tensor
    """int64 expert ids, best first."""
    weight_TK: Tensor
    """Combine weights (float32)."""
    probs_TE: Tensor
    """Softmax over all experts (float32), for the load-balancing loss."""
    logits_TE: Tensor
    """Raw float32 logits, for the z-loss."""


class TopKRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))

    def forward(self, x_TD: Tensor) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight_ED.float().t()
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_index_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            # Not for top-1: p/p == 1 would cut the language-model gradient to the router (Switch keeps p).
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return Routing(expert_index_TK, weight_TK, probs_TE, logits_TE)


def load_balance_loss(probs_TE: Tensor, global_tokens_per_expert_E: Tensor) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e, normalised so perfect balance gives 1.

    f_e (fraction of routed token copies that chose e) comes from the *global*
    batch, P_e (mean router probability) from this rank's tokens. Averaging this
    value over data-parallel ranks (as gradient averaging does) gives exactly the
    loss of the whole global batch computed in one process.
    """
    num_experts = probs_TE.shape[-1]
    f_E = global_tokens_per_expert_E.float() / global_tokens_per_expert_E.sum().clamp(min=1)
    return num_experts * (f_E.detach() * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
