"""Hand-worked cases of sorting token copies by expert, capacity drops and the inverse."""
from __future__ import annotations

import torch

from moeyard.models.moe.permutation import expert_capacity, permute, plan_permutation, unpermute


def test_copies_are_grouped_by_expert_choice_major() -> None:
    # 3 tokens, top-2, 3 experts.  token0 -> (2, 0), token1 -> (0, 1), token2 -> (2, 1)
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    perm = plan_permutation(idx, 3, capacity=None)
    # expert 0: token1 (1st choice), token0 (2nd); expert 1: token1, token2 (2nd choices); expert 2: token0, token2
    assert perm.token_index_S.tolist() == [1, 0, 1, 2, 0, 2]
    assert perm.copy_index_S.tolist() == [2, 1, 3, 5, 0, 4]
    assert perm.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert int(perm.dropped) == 0


def test_unpermute_weights_and_sums_each_token() -> None:
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    weight = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    perm = plan_permutation(idx, 3, capacity=None)
    x = torch.tensor([[1.0], [10.0], [100.0]])
    # "experts" multiply by (expert id + 1)
    y = permute(x, perm) * torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]).unsqueeze(1)
    out = unpermute(y, perm, weight)
    expected = [0.7 * 3 * 1 + 0.3 * 1 * 1, 0.6 * 1 * 10 + 0.4 * 2 * 10, 0.9 * 3 * 100 + 0.1 * 2 * 100]
    torch.testing.assert_close(out.squeeze(1), torch.tensor(expected))


def test_capacity_keeps_first_choices_before_second_choices() -> None:
    # 4 tokens, top-2, 2 experts, capacity 2 per expert.
    idx = torch.tensor([[1, 0], [0, 1], [0, 1], [0, 1]])
    assert expert_capacity(4, 2, 2, 0.5) == 2
    perm = plan_permutation(idx, 2, capacity=2)
    # expert 0 first choices: tokens 1, 2, 3 -> keep 1, 2; token0's 2nd choice is dropped too.
    # expert 1 first choice: token 0; then 2nd choices token1, 2, 3 -> keep token1.
    assert perm.routed_per_expert_E.tolist() == [4, 4]
    assert perm.tokens_per_expert_E.tolist() == [2, 2]
    assert perm.token_index_S.tolist() == [1, 2, 0, 1]
    assert int(perm.dropped) == 4


def test_fully_dropped_token_gets_zero_and_no_gradient_leak() -> None:
    idx = torch.tensor([[0], [0], [0]])
    perm = plan_permutation(idx, 2, capacity=1)
    x = torch.ones(3, 2, requires_grad=True)
    out = unpermute(permute(x, perm) * 2.0, perm, torch.ones(3, 1))
    assert out.tolist() == [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    out.sum().backward()
    assert x.grad.tolist() == [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
