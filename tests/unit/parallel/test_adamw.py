"""LowPrecisionMomentsAdamW: torch's AdamW arithmetic with the moments stored in bfloat16."""
from __future__ import annotations

import torch

from moeyard.parallel.grads.adamw import LowPrecisionMomentsAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _train(make_optimizer, steps: int = 20) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """`steps` updates of two tensors (one decayed, one not) from the same gradients."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))
    opt = make_optimizer([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad, b.grad = torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
        opt.step()
    return [w.detach(), b.detach()], opt


def test_float32_moments_update_bit_for_bit_as_torch_adamw() -> None:
    ours, _ = _train(lambda groups: LowPrecisionMomentsAdamW(groups, **HYPER, weight_decay=0.0,
                                                             moment_dtype=torch.float32))
    theirs, _ = _train(lambda groups: torch.optim.AdamW(groups, **HYPER, foreach=False))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_bfloat16_moments_halve_the_state_and_stay_close() -> None:
    """The moments are bfloat16 (2 bytes each), the parameters float32; after 20 steps the parameters are
    within 1% of the float32-moment run's movement and not equal to it (the rounding is real)."""
    start = _train(lambda groups: torch.optim.AdamW(groups, **HYPER), steps=0)[0]
    low, opt = _train(lambda groups: LowPrecisionMomentsAdamW(groups, **HYPER, weight_decay=0.0))
    full, _ = _train(lambda groups: torch.optim.AdamW(groups, **HYPER))
    for s0, a, b in zip(start, low, full):
        assert a.dtype == torch.float32
        assert not torch.equal(a, b)
        assert (a - b).norm() < 1e-2 * (b - s0).norm()
    for state in opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_float32_state_from_a_checkpoint_is_taken_in_bfloat16() -> None:
    """A checkpoint written with float32 moments resumes into bfloat16 moments: values rounded, step kept."""
    _, full = _train(lambda groups: torch.optim.AdamW(groups, **HYPER), steps=3)
    _, low = _train(lambda groups: LowPrecisionMomentsAdamW(groups, **HYPER, weight_decay=0.0), steps=0)
    for p_full, p_low in zip(full.state, [p for g in low.param_groups for p in g["params"]]):
        low.state[p_low] = {k: v.clone() for k, v in full.state[p_full].items()}
        p_low.grad = torch.zeros_like(p_low)
    low.step()
    for p_full, p_low in zip(full.state, [p for g in low.param_groups for p in g["params"]]):
        assert low.state[p_low]["exp_avg"].dtype == torch.bfloat16
        assert float(low.state[p_low]["step"]) == 4
        torch.testing.assert_close(low.state[p_low]["exp_avg"].float(), 0.9 * full.state[p_full]["exp_avg"],
                                   rtol=1e-2, atol=1e-6)
