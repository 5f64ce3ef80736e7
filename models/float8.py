"""FP8 GEMMs for training (train.fp8=rowwise): the blocks' linear layers and routed experts multiply in
float8 e4m3.

DeepSeek-V3 trained its GEMMs in FP8 and kept the embedding, output layer, routers, norms and attention's
core in higher precision; torchao's "rowwise" recipe does the same for dense models with one scale per row.
Here every operand is scaled along the dimension the GEMM sums over: in forward a token's row over the model
dim and a weight's row over its inputs; for the input gradient the output gradient's rows and the weight's
columns; for the weight gradient the output gradient's and the input's columns over the tokens. Scales are
powers of two (exact to apply, no rounding beyond the cast), outputs come back in the compute dtype, and
the kernel is `torch._scaled_mm` (cuBLAS on sm89 and newer GPUs; a reference kernel on CPU, which the tests
use). The routed experts take FP8 in their forward and input-gradient GEMMs (the expert loop per expert; the
grouped GEMM through `torch._scaled_grouped_mm` on sm90), their weight gradients in the compute dtype: torch's
scaled grouped GEMM over token groups (2d x 2d) takes per-group scales this project has not run. Linear
layers whose input or output width is not a multiple of 16 (the kernel's alignment: gates such as Qwen's
shared-expert gate) stay in the compute dtype.

Shape legend: see models/__init__.py; here M rows of a GEMM, K the dimension it sums over, N its columns.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
ALIGN = 16
"""torch._scaled_mm on a GPU takes a GEMM's summed and column dimensions in multiples of 16."""
RECIPES = ("none", "rowwise")
_shared = threading.local()
"""This thread's shared_weight_casts scope; a thread of its own per lane (parallel/lanes.py)."""


@functools.cache
def multiply_writes_e4m3(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this device's multiply of `dtype` operands can store its product as e4m3 directly (torch's
    elementwise kernels cast to the output's dtype as they store; CPU's can): tried once on a tiny tensor."""
    try:
        torch.mul(torch.ones(1, ALIGN, device=device_type, dtype=dtype), torch.ones(1, 1, device=device_type,
                  dtype=dtype), out=torch.empty(1, ALIGN, device=device_type, dtype=E4M3))
    except (RuntimeError, TypeError):
        return False
    return True


def _scaled_cast(t_MK: Tensor, factor_M1: Tensor, out_MK: Tensor) -> None:
    """out = e4m3(t * factor): the product written straight into the e4m3 buffer where the device's multiply
    can, else through a temporary in t's dtype (one pass more)."""
    if multiply_writes_e4m3(t_MK.device.type, t_MK.dtype):
        torch.mul(t_MK, factor_M1, out=out_MK)
    else:
        out_MK.copy_(t_MK * factor_M1)


def quantize_rows(t_MK: Tensor, out_MK: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """t_MK in e4m3, each row scaled by a power of two that brings its largest entry within e4m3's range,
    and the scales [M, 1] (float32) that decode it: t = t8 * scale. Returned row-major whatever t's layout,
    or written into `out_MK` (e4m3, any strides: a view into a larger buffer).

    Two passes over t in eager mode: its largest entries, then the product with the reciprocal scale (exact
    in t's own dtype since it is a power of two, and never beyond e4m3's largest value, so unclamped) cast
    as it is written (_scaled_cast)."""
    # an all-zero row gets a scale whose reciprocal is still finite (zero times it stays zero)
    amax_M1 = torch.linalg.vector_norm(t_MK, ord=float("inf"), dim=-1, keepdim=True).float().clamp(min=2.0 ** -100)
    scale_M1 = torch.exp2(torch.ceil(torch.log2(amax_M1 / E4M3_MAX)))
    wide = t_MK if t_MK.dtype in (torch.float32, torch.bfloat16) else t_MK.float()  # bf16 holds 2^+-126
    t8_MK = torch.empty(t_MK.shape, dtype=E4M3, device=t_MK.device) if out_MK is None else out_MK
    _scaled_cast(wide, scale_M1.reciprocal().to(wide.dtype), t8_MK)
    return t8_MK, scale_M1


@dataclass
class _WeightCasts:
    """One scope's weights (by identity) and the casts made of their views."""

    weights: dict[int, Tensor]
    casts: dict[tuple, tuple[Tensor, Tensor, Tensor]]


@contextmanager
def shared_weight_casts(weights: Sequence[Tensor]) -> Iterator[None]:
    """Within it, a view of one of `weights` is quantized once per orientation and its casts shared: the
    pipelined exchange runs a layer's experts in chunks (parallel/exchange/overlap.py), and each chunk would
    otherwise cast every local expert's weights again, at DeepSeek-V3's shape several times the chunk's FP8
    GEMM time. The casts are held until the scope closes (one layer's pass: its local experts' weights, a
    byte an element per orientation). A nested scope adds its weights to the outermost one's."""
    outer = getattr(_shared, "scope", None)
    scope = outer or _WeightCasts({}, {})
    added = [id(w) for w in weights if id(w) not in scope.weights]
    scope.weights.update((id(w), w) for w in weights)  # held: their ids stay theirs while the scope lasts
    _shared.scope = scope
    try:
        yield
    finally:
        for key in added:
            del scope.weights[key]
        _shared.scope = outer


def quantize_weight(w_NK: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_rows of a weight operand, made once per shared_weight_casts() scope where w_NK is a view of
    one of the scope's weights (anything else, such as a dtype cast made per call, is quantized afresh and
    never held). The key is the view's address, layout and version, and the entry holds the view, so no
    other tensor can take its address while the scope lasts, and a weight changed in place is cast again."""
    scope = getattr(_shared, "scope", None)
    root = w_NK if w_NK._base is None else w_NK._base
    if scope is None or scope.weights.get(id(root)) is not root:
        return quantize_rows(w_NK)
    key = (w_NK.data_ptr(), tuple(w_NK.shape), w_NK.stride(), w_NK.dtype, w_NK._version)
    entry = scope.casts.get(key)
    if entry is None:
        entry = scope.casts[key] = (w_NK, *quantize_rows(w_NK))
    return entry[1], entry[2]


def packed_width(dim: int) -> int:
    """Bytes of one row pack_rows sends: a byte an element and its float32 scale."""
    return dim + 4


def pack_rows(x_SD: Tensor) -> Tensor:
    """x_SD's rows as they travel under train.fp8_dispatch: each row's e4m3 bytes (quantize_rows) followed by
    its float32 scale's four bytes, [S, D + 4] uint8: half of a bfloat16 row's bytes. DeepSeek-V3 dispatches
    its experts' inputs in FP8 for the same reason; the experts' first GEMMs multiply in FP8 anyway."""
    packed_SB = torch.empty(x_SD.shape[0], packed_width(x_SD.shape[1]), dtype=torch.uint8, device=x_SD.device)
    _, scale_S1 = quantize_rows(x_SD, packed_SB[:, :-4].view(E4M3))  # cast straight into the rows' bytes
    packed_SB[:, -4:] = scale_S1.view(torch.uint8)
    return packed_SB


def unpack_rows(packed_SB: Tensor, dtype: torch.dtype) -> Tensor:
    """pack_rows undone, in `dtype`: exact (an e4m3 value times a power of two fits bfloat16 and float32),
    and quantize_rows of the result gives back the same values (its GEMMs multiply what they would have
    multiplied without the trip; only the rows kept for weight gradients carry the rounding)."""
    scale_S1 = packed_SB[:, -4:].contiguous().view(torch.float32).to(dtype)  # a power of two: exact
    return packed_SB[:, :-4].view(E4M3).to(dtype).mul_(scale_S1)


def float8_mm(a_MK: Tensor, b_KN: Tensor, out_dtype: Optional[torch.dtype] = None, weight: bool = False) -> Tensor:
    """a_MK @ b_KN with both in e4m3: a scaled per row, b per column (each over K), the product in
    `out_dtype` (a's by default). K is padded with zeros to a multiple of ALIGN where it is not (the weight
    gradient's K is the micro-batch's tokens). `weight`: b is a weight (or its transpose), whose cast
    shared_weight_casts() shares."""
    out_dtype = out_dtype or a_MK.dtype
    if a_MK.shape[1] == 0:  # nothing summed (an expert's weight gradient over no rows)
        return a_MK.new_zeros(a_MK.shape[0], b_KN.shape[1], dtype=out_dtype)
    pad = -a_MK.shape[1] % ALIGN
    if pad:
        a_MK = torch.nn.functional.pad(a_MK, (0, pad))
        b_KN = torch.nn.functional.pad(b_KN, (0, 0, 0, pad))
    a8_MK, scale_a_M1 = quantize_rows(a_MK)
    b8_NK, scale_b_N1 = (quantize_weight if weight and not pad else quantize_rows)(b_KN.t())
    # the kernel takes the second operand column-major: b8_NK row-major, transposed
    return torch._scaled_mm(a8_MK, b8_NK.t(), scale_a=scale_a_M1, scale_b=scale_b_N1.t(), out_dtype=out_dtype)


def float8_grouped_mm(x_AK: Tensor, w_EKN: Tensor, offs_E: Tensor) -> Tensor:
    """torch._grouped_mm(x_AK, w_EKN, offs=offs_E) with both in e4m3: each row of x scaled, each expert's
    weight per column (over K). GPU only (torch._scaled_grouped_mm; no CPU kernel in torch 2.13), so it has
    never run here; groups must start at multiples of ALIGN rows (padded_groups)."""
    x8_AK, scale_x_A1 = quantize_rows(x_AK)
    w8_ENK, scale_w_EN1 = quantize_weight(w_EKN.transpose(-2, -1))
    # each expert's weight column-major, as the kernel takes its second operand
    return torch._scaled_grouped_mm(x8_AK, w8_ENK.transpose(-2, -1), scale_a=scale_x_A1.squeeze(-1),
                                    scale_b=scale_w_EN1.squeeze(-1), offs=offs_E, out_dtype=x_AK.dtype)


def float8_grouped_unsupported(x_SD: Tensor, capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why torch's FP8 grouped GEMM cannot run rows like x_SD here, or None: taken on sm90 GPUs only (torch's
    kernel may cover sm100 too; unverified here, so those run the expert loop's FP8 instead). `capability`:
    this GPU's unless given, for tests."""
    if not x_SD.is_cuda and capability is None:
        return f"torch {torch.__version__} has no CPU kernel for the FP8 grouped GEMM (torch._scaled_grouped_mm)"
    major, minor = capability or torch.cuda.get_device_capability(x_SD.device)
    if major != 9:
        return f"torch's FP8 grouped GEMM runs on sm90 GPUs, this one is sm{major}{minor} (the expert loop runs FP8)"
    return None


def eligible(in_features: int, out_features: int) -> bool:
    """Whether a linear layer of these widths takes FP8 (the kernel's alignment; a 1-wide gate never does)."""
    return in_features % ALIGN == 0 and out_features % ALIGN == 0


def float8_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why this process cannot run FP8 GEMMs in `dtype` on `device`, or None: one small GEMM is tried
    (the kernel exists by GPU generation and torch release, and on a GPU takes bfloat16 outputs only)."""
    if device.type == "cuda" and dtype != torch.bfloat16:
        return f"on a GPU its GEMMs return bfloat16, not {dtype} (set train.dtype=bfloat16 or auto)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"this GPU (sm{major}{minor}) has no FP8 tensor cores (sm89 Ada, sm90 Hopper and newer do)"
    probe = torch.ones(ALIGN, ALIGN, device=device, dtype=dtype)
    try:
        float8_mm(probe, probe)
    except (RuntimeError, NotImplementedError) as error:
        return f"torch {torch.__version__} has no row-wise scaled GEMM here ({str(error).splitlines()[0]})"
    return None


__all__ = ["ALIGN", "RECIPES", "eligible", "float8_grouped_mm", "float8_grouped_unsupported", "float8_mm",
           "float8_unsupported", "pack_rows", "packed_width", "quantize_rows", "quantize_weight", "shared_weight_casts",
           "unpack_rows"]
