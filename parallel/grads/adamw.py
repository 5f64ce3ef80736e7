"""AdamW with its two moments stored in bfloat16 (optim.moment_dtype), as DeepSeek-V3 trained.

torch.optim.AdamW refuses moments of another dtype than the parameter's. Here each step reads a
parameter's moments into float32, runs torch's AdamW arithmetic on them and the float32 parameter
(the same operations in the same order: with float32 moments the updates are bit-equal to torch's),
and stores the moments back rounded to nearest. Half the moment bytes (4 instead of 8 a parameter);
the update stays float32. Works on FSDP2's DTensor shards as on plain tensors, one parameter at a time,
so the float32 working copies never exceed the largest parameter.

The moments are kept as torch's AdamW keys them (step, exp_avg, exp_avg_sq): checkpoints store what is
held, and a checkpoint written with float32 moments resumes into bfloat16 ones and back.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float,
                 betas: tuple[float, float], eps: float, step: int) -> None:
    """torch.optim.AdamW's update of `param` (weight decay is the caller's), in its order of operations: the
    moments are read into float32 (float32 ones are updated in place) and stored back in their dtype."""
    beta1, beta2 = betas
    m = exp_avg.float().lerp_(grad, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


class LowPrecisionMomentsAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, moment_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):  # loaded from a checkpoint in another dtype
            if state[key].dtype != self.moment_dtype:
                state[key] = state[key].to(self.moment_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None) -> None:
        assert closure is None, "no closure: moeyard's step computes the loss itself"
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                p.mul_(1 - lr * decay)
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=lr, betas=group["betas"],
                             eps=group["eps"], step=int(state["step"]))
