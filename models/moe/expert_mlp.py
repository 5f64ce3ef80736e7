"""What a routed expert computes, defined once for every path: per expert, over its rows,

    y = act(x W_gate + b_gate, x W_up + b_up) W_down + b_down

(biases optional, GPT-OSS has them), with act SwiGLU or GPT-OSS's clamped SwiGLU. Two paths compute it
behind GroupedExperts: the fused loop (expert_loop.py, CPU) and the grouped GEMM (experts.py, GPU). The
plain-autograd reference here is what tests hold both to.

Shape legend: see models/__init__.py. Here S rows grouped by expert, n rows of one expert, D model dim,
F expert hidden dim, E local experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ExpertActivation:
    """The gated unit of the routed experts (model.moe.activation, swiglu_alpha, swiglu_limit)."""

    kind: Literal["swiglu", "swiglu_clamped"] = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return F.silu(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)  # GPT-OSS
        return gate * torch.sigmoid(self.alpha * gate) * (up + 1)

    def backward(self, gate: Tensor, up: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """(d/d gate, d/d up) of `self(gate, up)` against `grad`, written out for the fused loop's backward;
        a clamped input passes no gradient where the clamp held it (as torch's clamp)."""
        if self.kind == "swiglu":
            return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)
        gate_c, up_c = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        s = torch.sigmoid(self.alpha * gate_c)
        d_gate = grad * (up_c + 1) * (s + self.alpha * gate_c * s * (1 - s)) * (gate <= self.limit)
        d_up = grad * gate_c * s * ((up >= -self.limit) & (up <= self.limit))
        return d_gate, d_up


def expert_mlp_reference(x_SD: Tensor, rows_per_expert: list[int], weights: tuple[Tensor, ...],
                         activation: ExpertActivation = ExpertActivation(), order: Optional[Tensor] = None) -> Tensor:
    """The reference: one expert at a time in plain autograd. `weights`: gate, up, down, then optionally
    b_gate, b_up, b_down. Rows grouped by expert, or x_SD[order] when `order` is given (outputs back in
    x_SD's order).

    The weights are taken apart with `unbind`, not indexed: the backward of `w[e]` would write each expert's
    gradient into its own zero-filled [E, ...] buffer (E^2 work), `unbind`'s stacks them once."""
    gate_EDF, up_EDF, down_EFD, *biases = weights
    rows = x_SD if order is None else x_SD.index_select(0, order)
    per_expert = [t.unbind(0) for t in (gate_EDF, up_EDF, down_EFD, *biases)]
    outputs = []
    for e, x_nD in enumerate(torch.split(rows, rows_per_expert)):
        g_nF, u_nF = x_nD @ per_expert[0][e], x_nD @ per_expert[1][e]
        if biases:
            g_nF, u_nF = g_nF + per_expert[3][e], u_nF + per_expert[4][e]
        y_nD = activation(g_nF, u_nF) @ per_expert[2][e]
        outputs.append(y_nD + per_expert[5][e] if biases else y_nD)
    y_SD = torch.cat(outputs) if outputs else x_SD.new_zeros(0, down_EFD.shape[-1])
    return y_SD if order is None else torch.empty_like(y_SD).index_copy_(0, order, y_SD)
