"""The routers of modern sparse models, chosen by `model.moe.router`.

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

Shape legend: B sequences, S positions, T = B*S tokens, D model dim, E experts, K experts per token,
C tokens per expert per sequence, G expert groups.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from moeyard.models.config import MoEConfig
from moeyard.models.moe.permutation import Permutation
from moeyard.models.moe.router import Router, Routing, limit_to_best_blocks


def renormalized(weight_TK: Tensor, renormalize: bool) -> Tensor:
    """Each token's k weights rescaled to sum to one when asked. Never for k=1: p/p == 1 would cut the
    language-model gradient to the router (Switch keeps p)."""
    if renormalize and weight_TK.shape[-1] > 1:
        return weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return weight_TK


def top_k_weights(probs_TE: Tensor, k: int, renormalize: bool,
                  select_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weights, expert ids) of each token's k most probable experts, optionally renormalized; with
    `select_TE` (the probabilities with disallowed experts at -inf) the k best of those, weighted by `probs_TE`."""
    if select_TE is None:
        weight_TK, expert_index_TK = probs_TE.topk(k, dim=-1)
    else:
        expert_index_TK = select_TE.topk(k, dim=-1).indices
        weight_TK = probs_TE.gather(1, expert_index_TK)
    return renormalized(weight_TK, renormalize), expert_index_TK


def nodes_reached(expert_index_TK: Tensor, num_experts: int, blocks: int) -> Tensor:
    """Mean over tokens of how many of the `blocks` expert blocks (nodes) each token's experts lie in."""
    block_TK = (expert_index_TK // (num_experts // blocks)).sort(dim=-1).values
    distinct_T = 1 + (block_TK[:, 1:] != block_TK[:, :-1]).sum(dim=-1)
    return distinct_T.float().mean()


class TopKRouter(Router):
    """Softmax then top-k (topk_softmax), or top-1 with jitter (switch)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool, jitter: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter = jitter

    def forward(self, x_BSD: Tensor) -> Routing:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_index_TK = top_k_weights(probs_TE, self.top_k, self.renormalize,
                                                   self.limit_nodes(probs_TE.detach(), self.top_k))
        return Routing(weight_TK, probs_TE, logits_TE, expert_index_TK=expert_index_TK)


class ExpertChoiceRouter(Router):
    """Each expert takes the C tokens of each sequence that score it highest."""

    def __init__(self, dim: int, num_experts: int, top_k: int, capacity_factor: float) -> None:
        super().__init__(dim, num_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def tokens_per_sequence(self, seq_len: int) -> int:
        """C: on average top_k * capacity_factor experts per token."""
        return min(seq_len, math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts))

    def forward(self, x_BSD: Tensor) -> Routing:
        B, S, D = x_BSD.shape
        E, C = self.num_experts, self.tokens_per_sequence(S)
        logits_TE = self.logits(x_BSD.reshape(-1, D))
        probs_TE = logits_TE.softmax(dim=-1)
        weight_BEC, position_BEC = probs_TE.view(B, S, E).transpose(1, 2).topk(C, dim=-1)
        offset_B11 = (torch.arange(B, device=x_BSD.device) * S).view(B, 1, 1)
        token_EBC = (position_BEC + offset_B11).permute(1, 0, 2)
        kept_E = torch.full((E,), B * C, dtype=torch.int64, device=x_BSD.device)
        permutation = Permutation(token_index_S=token_EBC.reshape(-1),
                                  copy_index_S=torch.arange(E * B * C, device=x_BSD.device),
                                  tokens_per_expert_E=kept_E, routed_per_expert_E=kept_E, num_tokens=B * S)
        balanced = logits_TE.new_zeros(())  # every expert gets exactly B*C tokens: nothing to balance
        return Routing(weight_BEC.permute(1, 0, 2), probs_TE, logits_TE, permutation=permutation,
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

    def forward(self, x_BSD: Tensor) -> Routing:
        logits_TE = self.logits(x_BSD.reshape(-1, x_BSD.shape[-1]))
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias_E.to(scores_TE.dtype)
        # Machines first, then groups inside them (groups nest in routing nodes: MoEConfig checks it).
        limited_TE = self.limit_nodes(choice_TE, self.top_k)
        choice_TE = choice_TE if limited_TE is None else limited_TE
        if self.n_groups > 1:
            choice_TE = self._limit_to_top_groups(choice_TE)
        expert_index_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weight_TK = renormalized(scores_TE.gather(1, expert_index_TK), self.renormalize)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)  # for the sequence-wise loss, entropy
        return Routing(weight_TK, probs_TE, logits_TE, expert_index_TK=expert_index_TK)

    def _limit_to_top_groups(self, choice_TE: Tensor) -> Tensor:
        """Mask experts outside each token's best groups; a group scores the sum of its two best experts."""
        return limit_to_best_blocks(choice_TE, self.n_groups, self.topk_groups, 2)

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

    def forward(self, x_BSD: Tensor) -> Routing:
        k, temperature = self.schedule()
        logits_TE = self.logits(x_BSD.reshape(-1, x_BSD.shape[-1]))
        probs_TE = (logits_TE / temperature).softmax(dim=-1)
        select_TE = self.limit_nodes(probs_TE.detach(), k)
        if select_TE is not None:  # the dense start cannot reach beyond the allowed nodes' experts
            k = min(k, self.node_limit[1] * (self.num_experts // self.node_limit[0]))
        weight_TK, expert_index_TK = top_k_weights(probs_TE, k, self.renormalize, select_TE)
        return Routing(weight_TK, probs_TE, logits_TE, expert_index_TK=expert_index_TK)

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
        return TopKRouter(dim, E, 1, renormalize=False, jitter=cfg.jitter)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(dim, E, K, cfg.capacity_factor or 1.0)
    if cfg.router == "sigmoid_bias":
        return SigmoidBiasRouter(dim, E, K, cfg.renormalize, cfg.bias_update_rate, cfg.n_groups, cfg.topk_groups)
    if cfg.router == "dense_to_sparse":
        return DenseToSparseRouter(dim, E, K, cfg.renormalize, cfg.dts_steps, cfg.dts_start_temperature,
                                   cfg.dts_end_temperature)
    raise ValueError(f"unknown router {cfg.router!r}")
