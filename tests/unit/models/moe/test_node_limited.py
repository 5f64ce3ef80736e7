"""Node-limited routing (model.moe.max_nodes_per_token): every token-choice router keeps each token within
its M best expert blocks, chosen as DeepSeek-V3 does (sum of the ceil(k/M) best scores per block)."""
from __future__ import annotations

import math

import pytest
import torch

from moeyard.errors import ConfigError
from moeyard.models import MoEConfig
from moeyard.models.config import DenseToSparseSettings, SigmoidBiasSettings
from moeyard.models.moe.layer import MoE
from moeyard.models.moe.routers import build_router, nodes_reached

E, K, NODES = 16, 4, 4
TOKEN_CHOICE = ["topk_softmax", "sigmoid_bias", "dense_to_sparse"]


def limited(router: str, bound: int, **extra):
    cfg = MoEConfig(num_experts=E, top_k=K, ffn_dim=4, router=router, max_nodes_per_token=bound,
                    routing_nodes=NODES, dense_to_sparse=DenseToSparseSettings(steps=4), **extra)
    torch.manual_seed(0)
    r = build_router(8, cfg)
    torch.nn.init.normal_(r.weight_ED)
    return r


def best_blocks_by_hand(scores: list[float], bound: int) -> set[int]:
    """The bound's best blocks of one token, each scored by the sum of its ceil(K / bound) best scores."""
    per, top = E // NODES, math.ceil(K / bound)
    sums = [sum(sorted(scores[b * per:(b + 1) * per], reverse=True)[:top]) for b in range(NODES)]
    return set(sorted(range(NODES), key=lambda b: -sums[b])[:bound])


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@pytest.mark.parametrize("bound", [1, 2, 3])
def test_each_token_stays_in_its_best_blocks(router: str, bound: int) -> None:
    r = limited(router, bound)
    if router == "dense_to_sparse":
        r.steps_done.fill_(4)  # past the schedule: top_k
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1))
    routing = r(x)
    blocks_NK = routing.expert_index_NK // (E // NODES)
    # the selection scores (the sigmoid router's bias is still zero)
    scores = (routing.probs_NE if router != "sigmoid_bias" else routing.logits_NE.sigmoid()).detach()
    for t in range(blocks_NK.shape[0]):
        reached = set(blocks_NK[t].tolist())
        assert len(reached) <= bound
        assert reached <= best_blocks_by_hand(scores[t].tolist(), bound), t
        # within the allowed blocks, the K best experts (by the selection score)
        allowed = [e for e in range(E) if e // (E // NODES) in best_blocks_by_hand(scores[t].tolist(), bound)]
        best = sorted(allowed, key=lambda e: -float(scores[t, e]))[:K]
        assert set(routing.expert_index_NK[t].tolist()) == set(best)
    assert float(nodes_reached(routing.expert_index_NK, E, NODES)) <= bound


def test_weights_are_the_router_probabilities_renormalized() -> None:
    r = limited("topk_softmax", 1)
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(2))
    routing = r(x)
    chosen = routing.probs_NE.gather(1, routing.expert_index_NK)
    torch.testing.assert_close(routing.weight, chosen / chosen.sum(-1, keepdim=True))


def test_unlimited_routing_reaches_more_blocks_and_the_layer_logs_it() -> None:
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(3))
    free = MoE(8, MoEConfig(num_experts=E, top_k=K, ffn_dim=4, routing_nodes=NODES))
    bounded = MoE(8, MoEConfig(num_experts=E, top_k=K, ffn_dim=4, routing_nodes=NODES, max_nodes_per_token=1))
    bounded.load_state_dict(free.state_dict())
    free_nodes = float(free(x)[1].nodes_per_token)
    assert float(bounded(x)[1].nodes_per_token) == 1.0 < free_nodes <= K
    assert MoE(8, MoEConfig(num_experts=E, top_k=K, ffn_dim=4))(x)[1].nodes_per_token is None


def test_dense_to_sparse_start_takes_every_expert_of_the_allowed_blocks() -> None:
    r = limited("dense_to_sparse", 2)
    routing = r(torch.randn(1, 5, 8))
    assert routing.expert_index_NK.shape[1] == 2 * E // NODES  # k = E at the start, cut to the 2 blocks
    for blocks in (routing.expert_index_NK // (E // NODES)).tolist():
        assert len(set(blocks)) == 2  # all 8 experts of its two best blocks


@pytest.mark.parametrize("n_groups,topk_groups,bound", [(8, 4, 2), (16, 4, 1), (8, 2, 1), (4, 2, 2)])
def test_sigmoid_bias_groups_nest_in_the_allowed_blocks(n_groups: int, topk_groups: int, bound: int) -> None:
    """Blocks first, then the best groups inside them: a token stays within both limits."""
    r = limited("sigmoid_bias", bound, sigmoid_bias=SigmoidBiasSettings(n_groups=n_groups, topk_groups=topk_groups))
    with torch.no_grad():
        r.expert_bias_E.copy_(torch.randn(E, generator=torch.Generator().manual_seed(4)) * 0.1)
    routing = r(torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(5)))
    for experts in routing.expert_index_NK.tolist():
        assert len({e // (E // NODES) for e in experts}) <= bound
        assert len({e // (E // n_groups) for e in experts}) <= topk_groups


def test_groups_that_cannot_nest_in_the_bound_are_refused() -> None:
    with pytest.raises(ConfigError, match="topk_groups=4 exceeds the 2 groups of max_nodes_per_token=1"):
        MoEConfig(num_experts=16, top_k=4, router="sigmoid_bias", sigmoid_bias=SigmoidBiasSettings(n_groups=8,
                  topk_groups=4), routing_nodes=4, max_nodes_per_token=1)
    with pytest.raises(ConfigError, match="n_groups=2 must be a multiple of routing_nodes=4"):
        MoEConfig(num_experts=16, top_k=4, router="sigmoid_bias", sigmoid_bias=SigmoidBiasSettings(n_groups=2,
                  topk_groups=1), routing_nodes=4, max_nodes_per_token=2)


@pytest.mark.parametrize("changes,message", [
    ({"router": "expert_choice", "max_nodes_per_token": 1}, "router=expert_choice has experts choose tokens"),
    ({"max_nodes_per_token": 0}, "must be >= 1"),
    ({"routing_nodes": 3}, "routing_nodes=3 must divide"),
    ({"routing_nodes": 4, "max_nodes_per_token": 1, "top_k": 5}, "exceeds the experts of max_nodes_per_token=1"),
])
def test_bad_node_limits_are_refused(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{"num_experts": 16, "top_k": 2, **changes})
