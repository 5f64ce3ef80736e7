"""Hierarchical dispatch carries routing weights inside the token rows: float32 exact in bf16 rows, both ways."""
from __future__ import annotations

import torch

from moeyard.parallel.exchange.hierarchical import weight_parts, weights_as_columns, weights_from_columns


def test_float32_weights_and_their_gradients_cross_bf16_rows_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    weight_UK = (torch.rand(64, 8, generator=g) * torch.logspace(-6, 1, 8)).requires_grad_()
    columns = weights_as_columns(weight_UK, torch.bfloat16)
    assert columns.dtype == torch.bfloat16 and columns.shape == (64, 8 * weight_parts(torch.bfloat16))
    # What the receiving machine sees: the columns moved as rows move (a copy through another tensor).
    received = torch.cat([columns, columns.new_zeros(64, 1)], dim=1)[:, :-1]
    back = weights_from_columns(received)
    assert back.dtype == torch.float32 and torch.equal(back, weight_UK.detach())
    grad_UK = torch.randn(64, 8, generator=g) * 1e-3
    back.backward(grad_UK)
    assert torch.equal(weight_UK.grad, grad_UK)
    assert not torch.equal(weight_UK.detach().to(torch.bfloat16).float(), weight_UK.detach()), "bf16 would round"


def test_float32_rows_carry_the_weights_as_they_are() -> None:
    weight_UK = torch.rand(4, 2, dtype=torch.float32)
    assert weight_parts(torch.float32) == 1
    assert torch.equal(weights_from_columns(weights_as_columns(weight_UK, torch.float32)), weight_UK)
