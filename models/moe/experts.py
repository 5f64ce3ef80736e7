"""Routed experts as stacked weights, and the two fast paths of their MLP (expert_mlp.py): the grouped GEMM
here (a GPU with its kernel) and the fused loop (expert_loop.py, everywhere else).

Shape legend: see models/__init__.py. Here E local experts, D model dim, F expert hidden dim, S rows (token
copies) grouped by expert, P rows of the padded grouped-GEMM buffer.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import moeyard.models.weight_steps as weight_steps
from moeyard.models.float8 import ALIGN as FP8_ALIGN
from moeyard.models.float8 import float8_grouped_unsupported
from moeyard.models.moe.expert_loop import expert_mlp_fused_loop
from moeyard.models.moe.expert_mlp import ExpertActivation
from moeyard.models.recompute import selective_checkpoint

GROUPED_MM_KERNELS = {(2, 8): (9,), (2, 9): (9, 10)}
"""GPU generations (compute capability major) whose fast grouped-GEMM kernel (CUTLASS, bf16) each torch
release has: 2.8 sm90 only and no CPU kernel; 2.9 added sm100 and the loop fallback elsewhere (pytorch#156203,
#161407, #161717); later releases as 2.9. The zero-row groups on which releases up to 2.13 hang or return
garbage (pytorch#152668, #172439) never reach it: padded_groups gives every expert rows."""


def grouped_mm_unsupported(x_SD: Tensor, torch_version: Optional[str] = None,
                           capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why `torch._grouped_mm` cannot run these rows well here, or None. Its fast kernel (CUTLASS) takes
    bfloat16 on the GPUs of GROUPED_MM_KERNELS only; anything else on a GPU is a per-group loop that copies
    the offsets to the host on every call, so the expert loop is no worse. On CPU (torch >= 2.9) it always
    runs as that loop (tests use it). `torch_version`, `capability`: this process's unless given (tests)."""
    version_text = torch_version or torch.__version__
    version = tuple(int(part) for part in version_text.split("+")[0].split(".")[:2])
    oldest = min(GROUPED_MM_KERNELS)
    if version < oldest:
        return f"torch {version_text} is older than {'.'.join(map(str, oldest))}"
    majors = GROUPED_MM_KERNELS[min(version, max(GROUPED_MM_KERNELS))]
    if not x_SD.is_cuda and capability is None:
        return None if version >= (2, 9) else f"torch {version_text} has no CPU grouped GEMM (2.9 added one)"
    if x_SD.dtype != torch.bfloat16:
        return f"its fast kernel takes bfloat16 rows, not {x_SD.dtype} (set train.dtype=bfloat16)"
    major, minor = capability or torch.cuda.get_device_capability(x_SD.device)
    if major not in majors:
        gpus = " or ".join(f"sm{m}0" for m in majors)
        return f"torch {version_text}'s fast kernel needs an {gpus} GPU, this one is sm{major}{minor}"
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


def expert_mlp_grouped_mm(x_SD: Tensor, counts_E: Tensor, weights: tuple[Tensor, ...],
                          activation: ExpertActivation = ExpertActivation(), order: Optional[Tensor] = None,
                          fp8: bool = False) -> Tensor:
    """GPU fast path: the experts' MLP (expert_mlp.py; `weights` gate, up, down, then optionally the three
    biases) as three grouped GEMMs over all experts at once, on padded groups (see padded_groups).

    `counts_E` is a device tensor: the layer runs without a device-to-host synchronisation; each row's bias
    is gathered by its expert index, found on the device too. With `order`, expert-grouped row j is
    x_SD[order[j]] and outputs come back in x_SD's order; the gather and the padding are one scatter into
    the buffer. Padding rows get no gradient (their outputs are never read), so biases see real rows only.
    `fp8`: forward and input-gradient GEMMs in float8 (models/float8.py), groups of whole 16-row units."""
    w_gate_EDF, w_up_EDF, w_down_EFD, *biases = weights
    align = FP8_ALIGN if fp8 else group_row_alignment(x_SD)
    dest_S, offs_E, total = padded_groups(counts_E.to(x_SD.device), x_SD.shape[0], align)
    if order is not None:
        dest_S = torch.empty_like(dest_S).index_copy_(0, order, dest_S)
    x_AD = x_SD.new_zeros(total, x_SD.shape[1]).index_copy(0, dest_S, x_SD)
    h1_AF = weight_steps.grouped_mm(x_AD, w_gate_EDF, offs_E, fp8)
    h2_AF = weight_steps.grouped_mm(x_AD, w_up_EDF, offs_E, fp8)
    if biases:
        expert_A = torch.searchsorted(offs_E, torch.arange(total, dtype=offs_E.dtype, device=offs_E.device),
                                      right=True)
        h1_AF, h2_AF = h1_AF + biases[0][expert_A], h2_AF + biases[1][expert_A]
    y_SD = weight_steps.grouped_mm(activation(h1_AF, h2_AF), w_down_EFD, offs_E, fp8).index_select(0, dest_S)
    return y_SD + biases[2][expert_A[dest_S]] if biases else y_SD


class GroupedExperts(nn.Module):
    """All experts of a layer (or this rank's shard of them) in three stacked weights."""

    offset_parameters = ("b_gate_EF", "b_up_EF", "b_down_ED")
    """Additive offsets among its own parameters: zero at init, no weight decay (models.offset_parameter_ids)."""

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
        self.fp8 = False
        """train.fp8: forward and input-gradient GEMMs in float8 (Transformer.set_fp8, models/float8.py)."""
        self.fp8_dispatch = False
        """train.fp8_dispatch: the expert-parallel exchange sends these experts their rows as e4m3 bytes
        (models/float8.py pack_rows; parallel/exchange/flat.py): set with fp8 only."""
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

    def forward(self, x_SD: Tensor, rows_per_expert: list[int] | Tensor, order: Optional[Tensor] = None,
                executor: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """Rows grouped by expert; or, with `order`, expert-grouped rows are x_SD[order] and the output comes
        back in x_SD's own order (see expert_mlp_fused_loop).

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
        params = weights  # a deferred weight step adds to these parameters' gradients (models/weight_steps.py)
        if torch.is_autocast_enabled(device):
            # _grouped_mm is not an autocast op: cast explicitly to the autocast dtype.
            dtype = torch.get_autocast_dtype(device)
            x_SD, weights = x_SD.to(dtype), tuple(w.to(dtype) for w in weights)
        if self.uses_grouped_mm(x_SD):
            counts_E = rows_per_expert if isinstance(rows_per_expert, Tensor) else torch.tensor(rows_per_expert)
            if weight_steps.armed():  # the matrices themselves (cast inside), so that their weight steps may wait
                weights = (*params[:3], *weights[3:])
            return self._checkpointed(expert_mlp_grouped_mm, x_SD, counts_E, weights, self.activation, order,
                                      self.fp8)
        if isinstance(rows_per_expert, Tensor):
            rows_per_expert = rows_per_expert.tolist()  # the loop slices on the host
        return expert_mlp_fused_loop(x_SD, rows_per_expert, weights, self.activation, self.recompute, order, params,
                                     self.fp8)

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
        kernel = grouped_mm_unsupported(x_SD) or (float8_grouped_unsupported(x_SD) if self.fp8 else None)
        if self.compute == "auto":
            return reason is None and kernel is None
        reason = reason or kernel
        if reason is not None:
            raise ValueError(f"model.moe.expert_compute=grouped_mm cannot run here: {reason}. Use "
                             f"expert_compute=auto to fall back to the expert loop")
        return True
