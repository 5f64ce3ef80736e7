"""Routed experts as stacked weights, computed as one grouped SwiGLU.

Shape legend: E local experts, D model dim, F expert hidden dim, S rows (token
copies) grouped by expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeyard.models.moe.expert_loop import swiglu_fused_loop
from moeyard.models.recompute import selective_checkpoint


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


def gated_mlp_loop(x_SD: Tensor, rows_per_expert: list[int], weights: tuple[Tensor, ...],
                   activation: ExpertActivation, order: Optional[Tensor] = None) -> Tensor:
    """Experts with biases (gate, up, down, then b_gate, b_up, b_down) or another activation than SwiGLU,
    one expert at a time in plain autograd; rows grouped by expert, or x_SD[order] when `order` is given
    (outputs back in x_SD's order). Slower than the fused loop (autograd keeps every intermediate)."""
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


GROUPED_MM_MIN_TORCH = (2, 9)
"""The oldest torch whose grouped GEMM the checks below describe: 2.8 has it on sm90 only and no CPU
kernel; 2.9 added the sm100 kernel and the loop fallback (pytorch#156203, #161407, #161717). The zero-row
groups on which releases up to 2.13 hang or return garbage (pytorch#152668, #172439) never reach it:
padded_groups gives every expert rows."""


def grouped_mm_unsupported(x_SD: Tensor) -> Optional[str]:
    """Why `torch._grouped_mm` cannot run these rows well here, or None. Its fast kernel (CUTLASS) takes
    bfloat16 on sm90/sm100 only; anything else on a GPU is a per-group loop that copies the offsets to the
    host on every call, so the expert loop is no worse. On CPU it always runs as that loop (tests use it)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < GROUPED_MM_MIN_TORCH:
        return f"torch {torch.__version__} is older than {'.'.join(map(str, GROUPED_MM_MIN_TORCH))}"
    if not x_SD.is_cuda:
        return None
    if x_SD.dtype != torch.bfloat16:
        return f"its fast kernel takes bfloat16 rows, not {x_SD.dtype} (set train.dtype=bfloat16)"
    major, minor = torch.cuda.get_device_capability(x_SD.device)
    if major not in (9, 10):
        return f"its fast kernel needs an sm90 or sm100 GPU, this one is sm{major}{minor}"
    return None


def group_row_alignment(x_SD: Tensor) -> int:
    """Rows per group come in whole multiples of this: 16 bytes of a row index (the weight-gradient GEMM
    reduces over rows), and at least 8 (torchtitan's choice for bf16)."""
    return max(8, 16 // x_SD.element_size())


def padded_groups(counts_E: Tensor, rows: int, align: int) -> tuple[Tensor, Tensor, int]:
    """Place expert-grouped rows in a buffer where every group has a nonzero multiple of `align` rows.

    Returns each row's position in the buffer, the groups' int32 end offsets and the buffer's size. The size
    is the static bound roundup(rows, align) + align * E (the last group takes the slack, still a multiple of
    `align`), so nothing waits for the host.
    No group is empty: zero-row groups are where grouped GEMM kernels have failed, and an expert with only
    zero rows gets an exact zero gradient.
    """
    E = counts_E.numel()
    padded_E = (counts_E.clamp(min=1) + align - 1) // align * align
    ends_E = padded_E.cumsum(0)
    total = (rows + align - 1) // align * align + align * E
    offs_E = ends_E.to(torch.int32, copy=True)  # a copy: ends_E is read again below
    offs_E[-1] = total
    arange_E = torch.arange(E, device=counts_E.device)
    expert_of_row_S = torch.repeat_interleave(arange_E, counts_E, output_size=rows)
    shift_E = (ends_E - padded_E) - (counts_E.cumsum(0) - counts_E)
    dest_S = torch.arange(rows, device=counts_E.device) + shift_E[expert_of_row_S]
    return dest_S, offs_E, total


def swiglu_grouped_mm(x_SD: Tensor, counts_E: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor,
                      order: Optional[Tensor] = None) -> Tensor:
    """GPU fast path: three grouped GEMMs over all experts at once, on padded groups (see padded_groups).

    `counts_E` is a device tensor: the layer runs without a device-to-host synchronisation. With `order`,
    expert-grouped row j is x_SD[order[j]] and outputs come back in x_SD's order; the gather and the
    padding are one scatter into the buffer."""
    dest_S, offs_E, total = padded_groups(counts_E.to(x_SD.device), x_SD.shape[0], group_row_alignment(x_SD))
    if order is not None:
        dest_S = torch.empty_like(dest_S).index_copy_(0, order, dest_S)
    x_PD = x_SD.new_zeros(total, x_SD.shape[1]).index_copy(0, dest_S, x_SD)
    h_PF = F.silu(torch._grouped_mm(x_PD, w_gate_EDF, offs=offs_E)) * torch._grouped_mm(x_PD, w_up_EDF, offs=offs_E)
    return torch._grouped_mm(h_PF, w_down_EFD, offs=offs_E).index_select(0, dest_S)


class GroupedExperts(nn.Module):
    """All experts of a layer (or this rank's shard of them) in three stacked weights."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int,
                 compute: Literal["auto", "loop", "grouped_mm"] = "auto",
                 recompute: Literal["none", "selective", "full"] = "none",
                 bias: bool = False, activation: ExpertActivation = ExpertActivation()) -> None:
        super().__init__()
        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"GroupedExperts recompute={recompute!r}: use none, selective or full")
        self.compute = compute
        self.recompute = recompute
        """Activation checkpointing. full: keep only the input rows and run the expert MLPs again in backward;
        selective: keep the GEMM outputs and run the activation function and product again."""
        self.activation = activation
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.has_bias = bias
        if bias:
            self.b_gate_EF = nn.Parameter(torch.empty(num_experts, hidden_dim))
            self.b_up_EF = nn.Parameter(torch.empty(num_experts, hidden_dim))
            self.b_down_ED = nn.Parameter(torch.empty(num_experts, dim))

    @property
    def num_local_experts(self) -> int:
        return self.w_gate_EDF.shape[0]

    @property
    def weights(self) -> tuple[Tensor, ...]:
        """Gate, up and down, then their biases when the experts have them."""
        matrices = (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
        return matrices + ((self.b_gate_EF, self.b_up_EF, self.b_down_ED) if self.has_bias else ())

    @property
    def plain_swiglu(self) -> bool:
        """Bias-free SwiGLU: the fused loop and the grouped GEMM apply; otherwise gated_mlp_loop."""
        return not self.has_bias and self.activation.kind == "swiglu"

    def forward(self, x_SD: Tensor, rows_per_expert: list[int] | Tensor, order: Optional[Tensor] = None,
                executor: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """Rows grouped by expert; or, with `order`, expert-grouped rows are x_SD[order] and the output comes
        back in x_SD's own order (see swiglu_fused_loop).

        `executor(forward_with, weights, x_SD)` runs the experts its own way (the pipelined exchange). It is
        called from here, not beside this module, and must compute from the `x_SD` it is handed, so that
        hooks on the module (FSDP's all-gather of the weights, and its gradient reduce-scatter, which runs
        when the gradient of this input is computed) see every use of the weights."""
        if executor is not None:
            return executor(self.forward_with, self.weights, x_SD)
        return self.forward_with(x_SD, rows_per_expert, *self.weights, order=order)

    def forward_with(self, x_SD: Tensor, rows_per_expert: list[int] | Tensor, *weights: Tensor,
                     order: Optional[Tensor] = None) -> Tensor:
        """The experts as a function of explicit weights (`self.weights`' order), for executors that manage
        autograd themselves."""
        device = x_SD.device.type
        if torch.is_autocast_enabled(device):
            # _grouped_mm is not an autocast op: cast explicitly to the autocast dtype.
            dtype = torch.get_autocast_dtype(device)
            x_SD, weights = x_SD.to(dtype), tuple(w.to(dtype) for w in weights)
        if not self.plain_swiglu:  # never run on a GPU: there too a loop over experts with host counts
            if isinstance(rows_per_expert, Tensor):
                rows_per_expert = rows_per_expert.tolist()
            return self._checkpointed(gated_mlp_loop, x_SD, list(rows_per_expert), weights, self.activation, order)
        if not self.uses_grouped_mm(x_SD):
            if isinstance(rows_per_expert, Tensor):
                rows_per_expert = rows_per_expert.tolist()  # the loop slices on the host
            return swiglu_fused_loop(x_SD, rows_per_expert, *weights, recompute=self.recompute, order=order)
        counts_E = rows_per_expert if isinstance(rows_per_expert, Tensor) else torch.tensor(rows_per_expert)
        return self._checkpointed(swiglu_grouped_mm, x_SD, counts_E, *weights, order)

    def _checkpointed(self, fn: Callable[..., Tensor], *args) -> Tensor:
        """`fn(*args)` under this module's recompute mode (the fused loop has its own)."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        if self.recompute == "selective":
            return selective_checkpoint(fn, *args)
        return fn(*args)

    def uses_grouped_mm(self, x_SD: Tensor) -> bool:
        """Whether rows like x_SD (in the compute dtype) go through the grouped GEMM; if not, the expert loop,
        which reads the row counts on the host. auto: only where its fast kernel runs (grouped_mm_unsupported);
        grouped_mm: wherever it runs at all, an error naming why not."""
        if self.compute == "loop" or (self.compute == "auto" and not x_SD.is_cuda):
            return False
        # Rows must start on 16-byte boundaries: model dim and expert hidden dim in whole 16-byte units.
        unit = 16 // x_SD.element_size()
        aligned = all(n % unit == 0 for n in self.w_gate_EDF.shape[1:])
        reason = None if aligned else (f"model.dim and model.moe.ffn_dim must be multiples of {unit} in "
                                       f"{x_SD.dtype}; got {tuple(self.w_gate_EDF.shape[1:])}")
        if self.compute == "auto":
            return reason is None and grouped_mm_unsupported(x_SD) is None
        reason = reason or grouped_mm_unsupported(x_SD)
        if reason is not None:
            raise ValueError(f"model.moe.expert_compute=grouped_mm cannot run here: {reason}. Use "
                             f"expert_compute=auto to fall back to the expert loop")
        return True
