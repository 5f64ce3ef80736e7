"""models/weight_steps.py: the weight gradients a split backward queues for its weight step are the plain
backward's, added on top of what the parameters already hold; outside a splitting schedule nothing changes."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moeyard.models import GroupedExperts
from moeyard.models.weight_steps import Linear, deferring_weight_gradients, splitting_backward


def _backward(module: torch.nn.Module, run, dy: Tensor, x0: Tensor, *, split: bool, defer: bool,
              autocast: bool) -> tuple[Tensor, dict[str, Tensor], int]:
    """x0's gradient, each trained parameter's gradient added by this backward (after its weight step), and
    how many weight steps were queued."""
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for p in trained.values():
        p.grad = torch.ones_like(p)  # an earlier micro-batch's
    x0.grad = None
    queue: list = []
    with splitting_backward(split), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = run(x0 * 2)
    with deferring_weight_gradients(queue) if defer else torch.enable_grad():
        y.float().backward(dy)
    if defer and split:
        assert all(torch.equal(p.grad, torch.ones_like(p)) for n, p in trained.items() if "bias" not in n), \
            "the input step computed weight gradients"
    for step in queue:
        step()
    # run outside backward, a weight step must not record a graph (it would hold the activations it read)
    assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in trained.values())
    return x0.grad.clone(), {n: p.grad - 1 for n, p in trained.items()}, len(queue)


def _linear_case() -> tuple[torch.nn.Module, object, Tensor, Tensor]:
    lin = Linear(8, 6, bias=True)
    return lin, lin, torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 6)


def _fp8_linear_case() -> tuple[torch.nn.Module, object, Tensor, Tensor]:
    """An FP8 linear layer (models/float8.py): its deferred weight step runs the same FP8 GEMM as its backward."""
    lin = Linear(32, 16, bias=True)
    lin.fp8 = True
    return lin, lin, torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 16)


def _grouped_case() -> tuple[torch.nn.Module, object, Tensor, Tensor]:
    experts = GroupedExperts(4, 16, 32, compute="grouped_mm")
    for w in experts.weights:
        torch.nn.init.normal_(w, std=0.2)
    rows = torch.tensor([5, 0, 7, 4])
    return experts, lambda x: experts(x, rows), torch.randn(16, 16, requires_grad=True), torch.randn(16, 16)


@pytest.mark.parametrize("case,steps", [(_linear_case, 1), (_fp8_linear_case, 1), (_grouped_case, 3)],
                         ids=["linear", "fp8-linear", "grouped_mm"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_deferred_weight_gradients_are_the_plain_ones(case, steps: int, autocast: bool) -> None:
    """Armed and deferring, the input step leaves the weights' gradients alone and queues one weight step per
    weight GEMM, whose gradients equal the plain backward's (to float32 rounding: the GEMMs are laid out
    differently; under bf16 autocast to bf16's), in the parameter's dtype; the input's gradient is the same.
    Armed without deferring (a schedule's whole backward) computes them in place."""
    torch.manual_seed(0)
    module, run, x0, dy = case()
    plain_x, plain, none = _backward(module, run, dy, x0, split=False, defer=True, autocast=autocast)
    whole_x, whole, none_armed = _backward(module, run, dy, x0, split=True, defer=False, autocast=autocast)
    x, deferred, queued = _backward(module, run, dy, x0, split=True, defer=True, autocast=autocast)
    assert none == 0 and none_armed == 0 and queued == steps
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for got in (x, whole_x):
        torch.testing.assert_close(got, plain_x, **tol)
    for name, want in plain.items():
        assert torch.count_nonzero(want) > 0, name
        for got in (deferred[name], whole[name]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, **tol)


def test_frozen_weight_queues_nothing() -> None:
    """A frozen weight (an adapter's base layer, a frozen expert) gets no gradient and no weight step; the others
    of the same grouped GEMMs still defer theirs."""
    lin = Linear(4, 3, bias=False)
    lin.weight.requires_grad_(False)
    experts, run, x0, dy = _grouped_case()
    experts.w_gate_EDF.requires_grad_(False)
    queue: list = []
    with splitting_backward():
        y = lin(torch.randn(5, 4, requires_grad=True)).sum() + run(x0).mul(dy).sum()
    with deferring_weight_gradients(queue):
        y.backward()
    assert len(queue) == 2 and lin.weight.grad is None and experts.w_gate_EDF.grad is None and x0.grad is not None
