"""What every router returns, the router losses, and the routers of modern sparse models, chosen by
`model.moe.router`.

- topk_softmax (Mixtral, GShard, Qwen-MoE): softmax over experts, then the top k.
- switch (Switch Transformer): top-1 of the softmax, optional multiplicative jitter on the router input
  while training.
- expert_choice (Zhou et al. 2022): each expert picks its top tokens *of each sequence* up to its
  capacity; a token may get zero or several experts. Non-causal: whether a token is picked depends on
  the other tokens of its sequence, later ones included, so a decoder trained this way sees routing
  it cannot reproduce when generating token by token. Fine for encoders, for scoring whole sequences,
  and as an ablation; not for autoregressive generation. Per sequence (not per rank) keeps the choice
  the same at any world size.
- sigmoid_bias (DeepSeek-V3): sigmoid scores; a per-expert bias, used only to *select* experts, moves
  after every step against the global load (sign rule): aux-loss-free balance. Optional
  group-limited routing: each token may only use experts of its top `topk_groups` of `n_groups`.
- dense_to_sparse (EvoMoE's DTS gate, scheduled): starts with every token on every expert under a
  high-temperature softmax; over `dts_steps` optimizer steps the temperature falls and the number of
  experts per token falls linearly to top_k, so training starts dense and becomes sparse.

Shape legend (models/__init__.py): B sequences, T positions, N = B*T tokens, D, E experts, K experts per
token, G tokens an expert picks per sequence, M routing nodes (blocks of experts), X experts per block,
S copies grouped by expert. Router logits are computed in float32 (float64 when the
input is float64, for gradcheck) whatever the autocast dtype: small logit differences decide which expert a
token goes to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from moeyard.models.config import MoEConfig
from moeyard.models.moe.permutation import Permutation


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight."""

    weight: Tensor
    """Combine weights, indexed by the permutation's copy_index_S after flattening: [N, K] for token
    choice, [E, B, G] for expert choice."""
    probs_NE: Tensor
    """A distribution over experts per token, for the load-balancing loss and the router entropy."""
    logits_NE: Tensor
    """Raw logits, for the z-loss."""
    expert_index_NK: Optional[Tensor] = None
    """Token choice: int64 expert ids, best first; the MoE layer plans the permutation (and capacity)."""
    permutation: Optional[Permutation] = None
    """Expert choice: the router's own plan (experts picked their tokens)."""
    aux_loss: Optional[Tensor] = None
    """The router's own balance loss; None: the MoE layer computes the configured one."""


def router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def limit_to_best_blocks(score_NE: Tensor, blocks: int, keep: int, best_per_block: int) -> Tensor:
    """`score_NE` with every expert outside each token's `keep` best blocks of experts at -inf. Experts
    [i*E/blocks, (i+1)*E/blocks) form block i; a block scores the sum of its `best_per_block` best scores
    (DeepSeek-V3's group- and node-limited routing)."""
    N, E = score_NE.shape
    per_block = E // blocks
    score_NMX = score_NE.view(N, blocks, per_block)
    block_score_NM = score_NMX.topk(min(best_per_block, per_block), dim=-1).values.sum(dim=-1)
    best_NM = block_score_NM.topk(keep, dim=-1).indices
    allowed_NM = torch.zeros_like(block_score_NM, dtype=torch.bool).scatter_(1, best_NM, True)
    return score_NMX.masked_fill(~allowed_NM.unsqueeze(-1), float("-inf")).view(N, E)


class Router(nn.Module):
    """A linear scoring of tokens against experts; subclasses turn the logits into a Routing."""

    offset_parameters = ("bias_E",)
    """Additive offsets among its own parameters: zero at init, no weight decay (models.offset_parameter_ids)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.node_limit: Optional[tuple[int, int]] = None
        """(routing_nodes, max_nodes_per_token) under node-limited routing; None: no limit."""

    def limit_nodes(self, score_NE: Tensor, k: int) -> Optional[Tensor]:
        """Node-limited routing: `score_NE` with experts outside each token's best max_nodes_per_token
        blocks at -inf, a block scored by the sum of its best ceil(k / M) scores; None when unlimited."""
        if self.node_limit is None:
            return None
        blocks, keep = self.node_limit
        return limit_to_best_blocks(score_NE, blocks, keep, -(-k // keep))

    def add_bias(self) -> None:
        """A learned bias on every logit (GPT-OSS's router; model.moe.router_bias)."""
        self.bias_E = nn.Parameter(torch.zeros(self.num_experts, dtype=self.weight_ED.dtype,
                                               device=self.weight_ED.device))

    def logits(self, x_ND: Tensor) -> Tensor:
        dtype = router_dtype(x_ND)
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = x_ND.to(dtype) @ self.weight_ED.to(dtype).t()
            bias_E = getattr(self, "bias_E", None)
            return logits_NE if bias_E is None else logits_NE + bias_E.to(dtype)

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


def load_balance_loss(probs_NE: Tensor, global_tokens_per_expert_E: Tensor) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e, normalised so perfect balance gives 1.

    f_e (fraction of routed token copies that chose e) comes from the *global*
    batch, P_e (mean router probability) from this rank's tokens. Averaging this
    value over data-parallel ranks (as gradient averaging does) gives exactly the
    loss of the whole global batch computed in one process.
    """
    return balance_from_mean_probs(probs_NE.mean(dim=0), global_tokens_per_expert_E)


def balance_from_mean_probs(mean_probs_E: Tensor, global_tokens_per_expert_E: Tensor) -> Tensor:
    """load_balance_loss from P_E alone: what a layer keeps while its global counts are in flight."""
    f_E = global_tokens_per_expert_E.to(mean_probs_E.dtype) / global_tokens_per_expert_E.sum().clamp(min=1)
    return mean_probs_E.shape[-1] * (f_E.detach() * mean_probs_E).sum()


def sequence_balance_loss(probs_BTE: Tensor, expert_index_BTK: Tensor) -> Tensor:
    """The same loss per sequence, averaged over sequences (DeepSeek-V3's sequence-wise balance loss):
    no expert may be starved or flooded *within* a sequence. Local to each sequence, so the same at any
    world size."""
    B, S, E = probs_BTE.shape
    K = expert_index_BTK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BTE.dtype, device=probs_BTE.device)
    counts_BE.scatter_add_(1, expert_index_BTK.reshape(B, S * K),
                           torch.ones(B, S * K, dtype=probs_BTE.dtype, device=probs_BTE.device))
    f_BE = counts_BE / (S * K)
    return E * (f_BE.detach() * probs_BTE.mean(dim=1)).sum(dim=-1).mean()


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def router_entropy(probs_NE: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token distribution over experts: log(E) is uniform, 0 is one-hot."""
    p = probs_NE.detach()
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1).mean()


def renormalized(weight_NK: Tensor, renormalize: bool) -> Tensor:
    """Each token's k weights rescaled to sum to one when asked. Never for k=1: p/p == 1 would cut the
    language-model gradient to the router (Switch keeps p)."""
    if renormalize and weight_NK.shape[-1] > 1:
        return weight_NK / weight_NK.sum(dim=-1, keepdim=True)
    return weight_NK


def top_k_weights(probs_NE: Tensor, k: int, renormalize: bool,
                  select_NE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weights, expert ids) of each token's k most probable experts, optionally renormalized; with
    `select_NE` (the probabilities with disallowed experts at -inf) the k best of those, weighted by `probs_NE`."""
    if select_NE is None:
        weight_NK, expert_index_NK = probs_NE.topk(k, dim=-1)
    else:
        expert_index_NK = select_NE.topk(k, dim=-1).indices
        weight_NK = probs_NE.gather(1, expert_index_NK)
    return renormalized(weight_NK, renormalize), expert_index_NK


def nodes_reached(expert_index_NK: Tensor, num_experts: int, blocks: int) -> Tensor:
    """Mean over tokens of how many of the `blocks` expert blocks (nodes) each token's experts lie in."""
    block_NK = (expert_index_NK // (num_experts // blocks)).sort(dim=-1).values
    distinct_N = 1 + (block_NK[:, 1:] != block_NK[:, :-1]).sum(dim=-1)
    return distinct_N.float().mean()


class TopKRouter(Router):
    """Softmax then top-k (topk_softmax), or top-1 with jitter (switch)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool, jitter: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter = jitter

    def forward(self, x_BTD: Tensor) -> Routing:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        if self.training and self.jitter > 0:
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_NE = self.logits(x_ND)
        probs_NE = logits_NE.softmax(dim=-1)
        weight_NK, expert_index_NK = top_k_weights(probs_NE, self.top_k, self.renormalize,
                                                   self.limit_nodes(probs_NE.detach(), self.top_k))
        return Routing(weight_NK, probs_NE, logits_NE, expert_index_NK=expert_index_NK)


class ExpertChoiceRouter(Router):
    """Each expert takes the C tokens of each sequence that score it highest."""

    def __init__(self, dim: int, num_experts: int, top_k: int, capacity_factor: float) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def tokens_per_sequence(self, seq_len: int) -> int:
        """C: on average top_k * capacity_factor experts per token."""
        return min(seq_len, math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts))

    def forward(self, x_BTD: Tensor) -> Routing:
        B, S, D = x_BTD.shape
        E, C = self.num_experts, self.tokens_per_sequence(S)
        logits_NE = self.logits(x_BTD.reshape(-1, D))
        probs_NE = logits_NE.softmax(dim=-1)
        weight_BEG, position_BEG = probs_NE.view(B, S, E).transpose(1, 2).topk(C, dim=-1)
        offset_B11 = (torch.arange(B, device=x_BTD.device) * S).view(B, 1, 1)
        token_EBG = (position_BEG + offset_B11).permute(1, 0, 2)
        kept_E = torch.full((E,), B * C, dtype=torch.int64, device=x_BTD.device)
        permutation = Permutation(token_index_S=token_EBG.reshape(-1),
                                  copy_index_S=torch.arange(E * B * C, device=x_BTD.device),
                                  tokens_per_expert_E=kept_E, routed_per_expert_E=kept_E, num_tokens=B * S)
        balanced = logits_NE.new_zeros(())  # every expert gets exactly B*C tokens: nothing to balance
        return Routing(weight_BEG.permute(1, 0, 2), probs_NE, logits_NE, permutation=permutation,
                       aux_loss=balanced)


class SigmoidBiasRouter(Router):
    """DeepSeek-V3: select by sigmoid score + bias, weight by the score alone; the bias follows the load."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool, bias_update_rate: float,
                 n_groups: int = 1, topk_groups: int = 1) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize
        self.bias_update_rate = bias_update_rate
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.register_buffer("expert_bias_E", torch.zeros(num_experts))  # saved in checkpoints

    def forward(self, x_BTD: Tensor) -> Routing:
        logits_NE = self.logits(x_BTD.reshape(-1, x_BTD.shape[-1]))
        scores_NE = logits_NE.sigmoid()
        choice_NE = scores_NE.detach() + self.expert_bias_E.to(scores_NE.dtype)
        # Machines first, then groups inside them (groups nest in routing nodes: MoEConfig checks it).
        limited_NE = self.limit_nodes(choice_NE, self.top_k)
        choice_NE = choice_NE if limited_NE is None else limited_NE
        if self.n_groups > 1:
            choice_NE = self._limit_to_top_groups(choice_NE)
        expert_index_NK = choice_NE.topk(self.top_k, dim=-1).indices
        weight_NK = renormalized(scores_NE.gather(1, expert_index_NK), self.renormalize)
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)  # for the sequence-wise loss, entropy
        return Routing(weight_NK, probs_NE, logits_NE, expert_index_NK=expert_index_NK)

    def _limit_to_top_groups(self, choice_NE: Tensor) -> Tensor:
        """Mask experts outside each token's best groups; a group scores the sum of its two best experts."""
        return limit_to_best_blocks(choice_NE, self.n_groups, self.topk_groups, 2)

    @torch.no_grad()
    def step_done(self, global_tokens_per_expert_E: Tensor) -> None:
        # Every rank sees the same global load, so every replica of the bias moves alike.
        load_E = global_tokens_per_expert_E.to(self.expert_bias_E.dtype)
        self.expert_bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)

    def extra_metrics(self) -> dict[str, list[float]]:
        return {"expert_bias": self.expert_bias_E.tolist()}


class DenseToSparseRouter(Router):
    """Temperature-scaled softmax over all experts, annealed to top-k on a schedule of optimizer steps."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool, steps: int,
                 start_temperature: float, end_temperature: float) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize
        self.steps = steps
        self.start_temperature = start_temperature
        self.end_temperature = end_temperature
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))  # resumes with the run
        self._host_steps_done = ((-1, -1), 0)
        """((id, _version) of steps_done, its value) as last read: the host's copy, read again only after a
        change other than step_done's (a checkpoint load, a new buffer), so a forward does not wait for the
        device."""

    def _steps_done(self) -> int:
        key = (id(self.steps_done), self.steps_done._version)
        if self._host_steps_done[0] != key:
            self._host_steps_done = (key, int(self.steps_done))
        return self._host_steps_done[1]

    def schedule(self) -> tuple[int, float]:
        """(experts per token, temperature) now. k falls linearly from num_experts and reaches top_k exactly
        at the end of the schedule."""
        done = min(self._steps_done(), self.steps)
        k = self.num_experts - (self.num_experts - self.top_k) * done // self.steps
        temperature = self.start_temperature + (self.end_temperature - self.start_temperature) * done / self.steps
        return k, temperature

    def current_top_k(self) -> int:
        return self.schedule()[0]

    def temperature(self) -> float:
        return self.schedule()[1]

    def forward(self, x_BTD: Tensor) -> Routing:
        k, temperature = self.schedule()
        logits_NE = self.logits(x_BTD.reshape(-1, x_BTD.shape[-1]))
        probs_NE = (logits_NE / temperature).softmax(dim=-1)
        select_NE = self.limit_nodes(probs_NE.detach(), k)
        if select_NE is not None:  # the dense start cannot reach beyond the allowed nodes' experts
            k = min(k, self.node_limit[1] * (self.num_experts // self.node_limit[0]))
        weight_NK, expert_index_NK = top_k_weights(probs_NE, k, self.renormalize, select_NE)
        return Routing(weight_NK, probs_NE, logits_NE, expert_index_NK=expert_index_NK)

    @torch.no_grad()
    def step_done(self, global_tokens_per_expert_E: Tensor) -> None:
        done = self._steps_done() + 1
        self.steps_done += 1
        self._host_steps_done = ((id(self.steps_done), self.steps_done._version), done)

    def extra_metrics(self) -> dict[str, list[float]]:
        k, temperature = self.schedule()
        return {"experts_per_token": [float(k)], "temperature": [temperature]}


def build_router(dim: int, cfg: MoEConfig) -> Router:
    router = _router(dim, cfg)
    if cfg.router_bias:
        router.add_bias()
    if cfg.max_nodes_per_token is not None and (cfg.routing_nodes or 1) > cfg.max_nodes_per_token:
        router.node_limit = (cfg.routing_nodes, cfg.max_nodes_per_token)
    return router


def _router(dim: int, cfg: MoEConfig) -> Router:
    E, K = cfg.num_experts, cfg.top_k
    if cfg.router == "topk_softmax":
        return TopKRouter(dim, E, K, cfg.renormalize)
    if cfg.router == "switch":
        return TopKRouter(dim, E, 1, renormalize=False, jitter=cfg.switch.jitter)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(dim, E, K, cfg.capacity_factor or 1.0)
    if cfg.router == "sigmoid_bias":
        groups = cfg.sigmoid_bias
        return SigmoidBiasRouter(dim, E, K, cfg.renormalize, groups.bias_update_rate, groups.n_groups,
                                 groups.topk_groups)
    if cfg.router == "dense_to_sparse":
        dts = cfg.dense_to_sparse
        return DenseToSparseRouter(dim, E, K, cfg.renormalize, dts.steps, dts.start_temperature, dts.end_temperature)
    raise ValueError(f"unknown router {cfg.router!r}")
