"""Routed experts as stacked weights, computed as one grouped SwiGLU.

Shape legend: E local experts, D model dim, F expert hidden dim, S rows (token
copies) grouped by expert.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeyard.models.moe.expert_loop import swiglu_fused_loop


def swiglu_loop(x_SD: Tensor, rows_per_expert: list[int], w_gate_EDF: Tensor, w_up_EDF: Tensor,
                     w_down_EFD: Tensor) -> Tensor:
    """Reference: one matmul chain per expert over its rows, plain autograd (the fast path is
    expert_loop.swiglu_fused_loop).

    The weights are taken apart with `unbind`, not indexed: the backward of `w[e]` would write each
    expert's gradient into its own zero-filled [E, ...] buffer (E^2 work), `unbind`'s stacks them once.
    """
    outputs = [
        (F.silu(x_rD @ w_gate_DF) * (x_rD @ w_up_DF)) @ w_down_FD
        for x_rD, w_gate_DF, w_up_DF, w_down_FD in zip(torch.split(x_SD, rows_per_expert), w_gate_EDF.unbind(0),
                                                       w_up_EDF.unbind(0), w_down_EFD.unbind(0))
    ]
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, w_down_EFD.shape[-1])


def swiglu_grouped_mm(x_SD: Tensor, rows_per_expert: list[int] | Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor,
                      w_down_EFD: Tensor) -> Tensor:
    """GPU fast path: three grouped GEMMs over all experts at once. Row counts given as a device tensor
    never visit the host: the layer runs without a device-to-host synchronisation."""
    counts_E = rows_per_expert if isinstance(rows_per_expert, Tensor) else torch.tensor(rows_per_expert)
    offs_E = counts_E.to(x_SD.device).cumsum(0).to(torch.int32)
    h_SF = F.silu(torch._grouped_mm(x_SD, w_gate_EDF, offs=offs_E)) * torch._grouped_mm(x_SD, w_up_EDF, offs=offs_E)
    return torch._grouped_mm(h_SF, w_down_EFD, offs=offs_E)


class GroupedExperts(nn.Module):
    """All experts of a layer (or this rank's shard of them) in three stacked weights."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int,
                 compute: Literal["auto", "loop", "grouped_mm"] = "auto", recompute: bool = False) -> None:
        super().__init__()
        self.compute = compute
        self.recompute = recompute
        """Activation checkpointing: keep only the input rows, recompute the expert MLPs in backward."""
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    @property
    def num_local_experts(self) -> int:
        return self.w_gate_EDF.shape[0]

    @property
    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD

    def forward(self, x_SD: Tensor, rows_per_expert: list[int] | Tensor, order: Optional[Tensor] = None,
                executor: Optional[Callable[[Callable[..., Tensor], tuple[Tensor, ...]], Tensor]] = None) -> Tensor:
        """Rows grouped by expert; or, with `order`, expert-grouped rows are x_SD[order] and the output comes
        back in x_SD's own order (see swiglu_fused_loop).

        `executor(forward_with, weights)` runs the experts its own way (the pipelined exchange). It is called
        from here, not beside this module, so that hooks on the module (FSDP's all-gather of the weights
        and its gradient reduce-scatter) see every use of the weights."""
        if executor is not None:
            return executor(self.forward_with, self.weights)
        return self.forward_with(x_SD, rows_per_expert, *self.weights, order=order)

    def forward_with(self, x_SD: Tensor, rows_per_expert: list[int] | Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor,
                     w_down_EFD: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """The experts as a function of explicit weights, for executors that manage autograd themselves."""
        weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
        device = x_SD.device.type
        if torch.is_autocast_enabled(device):
            # _grouped_mm is not an autocast op: cast explicitly to the autocast dtype.
            dtype = torch.get_autocast_dtype(device)
            x_SD, weights = x_SD.to(dtype), tuple(w.to(dtype) for w in weights)
        if not self._use_grouped_mm(x_SD):
            if isinstance(rows_per_expert, Tensor):
                rows_per_expert = rows_per_expert.tolist()  # the loop slices on the host
            return swiglu_fused_loop(x_SD, rows_per_expert, *weights, recompute=self.recompute, order=order)
        if order is not None:  # the grouped GEMM wants expert-grouped rows: gather, run, scatter back
            y_SD = self.forward_with(x_SD.index_select(0, order), rows_per_expert, *weights)
            return torch.empty_like(y_SD).index_copy(0, order, y_SD)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(swiglu_grouped_mm, x_SD, rows_per_expert, *weights, use_reentrant=False)
        return swiglu_grouped_mm(x_SD, rows_per_expert, *weights)

    def _use_grouped_mm(self, x_SD: Tensor) -> bool:
        if self.compute == "loop" or (self.compute == "auto" and not x_SD.is_cuda):
            return False
        # The grouped GEMM needs 16-byte aligned rows: model dim and expert hidden dim in whole 16-byte units.
        unit = 16 // x_SD.element_size()
        aligned = all(n % unit == 0 for n in self.w_gate_EDF.shape[1:])
        if self.compute == "grouped_mm" and not aligned:
            raise ValueError(f"model.moe.expert_compute=grouped_mm needs model.dim and model.moe.ffn_dim to be "
                             f"multiples of {unit} in {x_SD.dtype}; got {tuple(self.w_gate_EDF.shape[1:])}. "
                             f"Use expert_compute=auto to fall back to the loop")
        return aligned
