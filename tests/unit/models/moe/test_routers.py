"""Each router: a hand-computed case, a float64 gradcheck of a tiny MoE layer, capacity and expert choice
under a skewed distribution, and the stateful routers' schedules (bias balance, dense-to-sparse)."""
from __future__ import annotations

import math

import pytest
import torch

from moeyard.errors import ConfigError
from moeyard.models import MoEConfig
from moeyard.models.config import DenseToSparseSettings, SigmoidBiasSettings, SwitchSettings
from moeyard.models.moe.layer import MoE
from moeyard.models.moe.routers import (
    DenseToSparseRouter,
    ExpertChoiceRouter,
    SigmoidBiasRouter,
    TopKRouter,
    router_entropy,
    sequence_balance_loss,
)

ROUTERS = ["topk_softmax", "switch", "expert_choice", "sigmoid_bias", "dense_to_sparse"]


def moe_config(router: str, **extra) -> MoEConfig:
    top_k = 1 if router == "switch" else 2
    return MoEConfig(num_experts=4, top_k=top_k, ffn_dim=3, router=router,
                     dense_to_sparse=DenseToSparseSettings(steps=4), **extra)


def identity_router(router, weight_ED: list[list[float]]):
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor(weight_ED))
    return router


def skewed_moe(router: str, **extra) -> MoE:
    """Every token scores expert 0 far above the others."""
    torch.manual_seed(0)
    moe = MoE(4, moe_config(router, **extra))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.router.weight_ED[0] = 5.0
    return moe


def test_switch_keeps_the_top1_probability_and_jitters_only_in_training() -> None:
    router = identity_router(TopKRouter(2, 2, 1, renormalize=False, jitter=0.5), [[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[3.0, 1.0]]])
    router.eval()
    routing = router(x)
    p = torch.softmax(torch.tensor([3.0, 1.0]), 0)
    assert routing.expert_index_NK.tolist() == [[0]]
    torch.testing.assert_close(routing.weight, p[:1].view(1, 1))
    router.train()
    torch.manual_seed(0)
    jittered = router(x.expand(1, 64, 2))
    assert not torch.allclose(jittered.logits_NE, jittered.logits_NE[:1].expand(64, 2)), "no jitter in training"
    assert ((jittered.logits_NE[:, 0] >= 1.5) & (jittered.logits_NE[:, 0] <= 4.5)).all()  # x * U(0.5, 1.5)


def test_expert_choice_lets_each_expert_take_its_best_tokens_of_each_sequence() -> None:
    # 2 experts, top_k=1, capacity 1: C = ceil(1 * 4 * 1 / 2) = 2 tokens per expert per sequence.
    router = identity_router(ExpertChoiceRouter(2, 2, top_k=1, capacity_factor=1.0), [[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 1.0]],    # sequence 0
                      [[0.0, 5.0], [0.0, 4.0], [0.0, 3.0], [0.0, 2.0]]])   # sequence 1
    routing = router(x)
    perm = routing.permutation
    assert perm.tokens_per_expert_E.tolist() == [4, 4]
    probs = routing.probs_NE
    # Expert 0 takes tokens 0, 1 of sequence 0 and the two of sequence 1 that score it highest (3 then 2,
    # i.e. global tokens 7, 6); expert 1 takes 3, 2 of sequence 0 and 4, 5 of sequence 1.
    assert perm.token_index_S.tolist() == [0, 1, 7, 6, 3, 2, 4, 5]
    weights = routing.weight.reshape(-1)
    torch.testing.assert_close(weights, torch.stack([probs[t, e] for e, t in zip([0] * 4 + [1] * 4,
                                                                                  perm.token_index_S.tolist())]))
    # Tokens may get zero or several experts: on random inputs, some get none and some more than one.
    torch.manual_seed(0)
    router4 = ExpertChoiceRouter(4, 4, top_k=1, capacity_factor=1.0)
    torch.nn.init.normal_(router4.weight_ED)
    chosen = torch.bincount(router4(torch.randn(1, 16, 4)).permutation.token_index_S, minlength=16)
    assert chosen.sum() == 16 and chosen.min() == 0 and chosen.max() >= 2
    skewed = router(torch.tensor([[[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]]]))
    # Every token prefers expert 0, yet expert 1 still takes exactly C=2 (the ones it scores highest).
    assert skewed.permutation.tokens_per_expert_E.tolist() == [2, 2]
    assert skewed.permutation.token_index_S.tolist() == [0, 1, 3, 2]


def test_sigmoid_bias_selects_with_the_bias_but_weights_without_it() -> None:
    router = identity_router(SigmoidBiasRouter(2, 3, top_k=1, renormalize=False, bias_update_rate=0.1),
                             [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    x = torch.tensor([[[2.0, 1.0]]])
    assert router(x).expert_index_NK.tolist() == [[0]]
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.5, 0.0]))  # sigmoid(1) + 0.5 > sigmoid(2)
    routing = router(x)
    assert routing.expert_index_NK.tolist() == [[1]]
    torch.testing.assert_close(routing.weight, torch.sigmoid(torch.tensor([[1.0]])))
    router.step_done(torch.tensor([6, 0, 3]))  # mean 3: over-, under- and exactly loaded
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, 0.6, 0.0]))
    assert router.extra_metrics() == {"expert_bias": pytest.approx([-0.1, 0.6, 0.0])}


def test_sigmoid_bias_group_limited_routing() -> None:
    # 4 experts in 2 groups; the token scores experts 0 and 3 best, but group {2, 3} scores higher in sum.
    router = SigmoidBiasRouter(4, 4, top_k=2, renormalize=True, bias_update_rate=0.0, n_groups=2, topk_groups=1)
    identity_router(router, torch.eye(4).tolist())
    x = torch.tensor([[[3.0, -3.0, 1.0, 2.5]]])
    assert sorted(router(x).expert_index_NK.tolist()[0]) == [2, 3]
    router.topk_groups = 2
    assert sorted(router(x).expert_index_NK.tolist()[0]) == [0, 3]


def test_dense_to_sparse_anneals_from_all_experts_to_top_k() -> None:
    router = DenseToSparseRouter(2, 8, top_k=2, renormalize=True, steps=6, start_temperature=3.0,
                                 end_temperature=1.0)
    schedule = []
    for _ in range(8):
        schedule.append((router.current_top_k(), router.temperature()))
        router.step_done(torch.zeros(8))
    assert [k for k, _ in schedule] == [8, 7, 6, 5, 4, 3, 2, 2]
    assert schedule[0][1] == 3.0 and schedule[6][1] == 1.0 and schedule[7][1] == 1.0
    x = torch.tensor([[[1.0, 0.5]]])
    identity_router(router, [[1.0, 0.0]] * 8)
    router.steps_done.zero_()
    routing = router(x)
    assert routing.weight.shape == (1, 8)
    torch.testing.assert_close(routing.weight.sum(), torch.tensor(1.0))


def test_sequence_balance_loss_and_entropy_by_hand() -> None:
    # One sequence of 2 tokens, 2 experts, top-1: both tokens choose expert 0.
    probs = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]])
    loss = sequence_balance_loss(probs, torch.tensor([[[0], [0]]]))
    assert loss.item() == pytest.approx(2 * (1.0 * 0.5 + 0.0 * 0.5))
    # Two sequences, 3 experts, top-2: E * sum_e f_e P_e per sequence with f_e = count_e / (S * K), averaged.
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], [[0.6, 0.2, 0.2], [0.6, 0.3, 0.1]]])
    chosen = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [0, 1]]])
    seq0 = 3 * (1 / 4 * 0.35 + 2 / 4 * 0.4 + 1 / 4 * 0.25)
    seq1 = 3 * (2 / 4 * 0.6 + 2 / 4 * 0.25 + 0 * 0.15)
    assert sequence_balance_loss(probs, chosen).item() == pytest.approx((seq0 + seq1) / 2)
    assert router_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("changes,message", [
    ({"router": "switch", "top_k": 2}, "router=switch routes each token to one expert"),
    ({"switch": SwitchSettings(jitter=0.1)}, "jitter applies to router=switch only"),
    ({"router": "sigmoid_bias", "sigmoid_bias": SigmoidBiasSettings(n_groups=3)}, "n_groups=3 must divide"),
    ({"router": "sigmoid_bias", "sigmoid_bias": SigmoidBiasSettings(n_groups=4, topk_groups=1), "top_k": 3},
     "exceeds the experts of"),
    ({"sigmoid_bias": SigmoidBiasSettings(n_groups=2)}, "applies to router=sigmoid_bias only"),
    ({"router": "expert_choice", "balance_loss": "sequence"}, "balanced by construction"),
])
def test_bad_router_settings_are_refused(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{"num_experts": 4, "top_k": 2, **changes})


@pytest.mark.parametrize("router", ROUTERS)
def test_gradcheck_float64(router: str) -> None:
    """The layer output and the router losses are differentiable where routing is fixed: finite differences
    agree with autograd for the input, the router and the expert weights."""
    torch.manual_seed(3)
    balance = "sequence" if router == "sigmoid_bias" else "batch"
    moe = MoE(4, moe_config(router, num_shared_experts=1, balance_loss=balance)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    names = ["router.weight_ED", "experts.w_gate_EDF"]
    params = {n: p for n, p in moe.named_parameters()}

    def layer(x, *weights):
        out, stats = torch.func.functional_call(moe, dict(zip(names, weights)), (x,))
        return out, stats.aux_loss, stats.z_loss

    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weights = [params[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(layer, (x, *weights), eps=1e-6, atol=1e-5)


def test_capacity_mode_drops_what_a_skewed_router_sends_over_capacity() -> None:
    moe = skewed_moe("topk_softmax", capacity_factor=1.0)
    x = torch.rand(2, 8, 4) + 0.5  # positive: expert 0 wins every token
    _, stats = moe(x)
    capacity = math.ceil(1.0 * 16 * 2 / 4)  # 8 copies per expert
    routed = stats.tokens_per_expert_E.tolist()
    assert routed[0] == 16  # every token's first choice
    assert int(stats.dropped) == sum(max(0, c - capacity) for c in routed) >= 8


def test_expert_choice_stays_balanced_and_dropless_under_a_skewed_router() -> None:
    moe = skewed_moe("expert_choice")
    _, stats = moe(torch.rand(2, 8, 4) + 0.5)
    C = math.ceil(1.0 * 8 * 2 / 4)
    assert stats.tokens_per_expert_E.tolist() == [2 * C] * 4 and int(stats.dropped) == 0
    assert float(stats.aux_loss) == 0.0


def test_dense_to_sparse_compute_per_token_falls_to_top_k() -> None:
    """Count the expert rows the layer computes while the schedule runs."""
    moe = MoE(4, moe_config("dense_to_sparse"))  # 4 experts, top_k 2, 4 steps
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    rows = []
    original = moe.experts.forward

    def counting(x_SD, counts):
        rows.append(x_SD.shape[0])
        return original(x_SD, counts)

    moe.experts.forward = counting
    x = torch.randn(2, 8, 4)
    for _ in range(6):
        _, stats = moe(x)
        moe.router.step_done(stats.tokens_per_expert_E)
    assert [r // 16 for r in rows] == [4, 4, 3, 3, 2, 2]  # experts per token, step by step
    assert rows[-1] == 16 * 2 and moe.router.current_top_k() == 2
