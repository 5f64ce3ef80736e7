"""Which fused kernel runs each attention path on this device, named once at start-up, with a one-line
warning where a path falls back to a slower one.

- causal (grouped-query): SDPA, which picks flash on a GPU in half precision.
- MLA: SDPA. Flash takes one head size for queries, keys and values; MLA's values (128) are narrower than
  its queries and keys (192), so on a GPU the values are padded with zeros to 192 and the output cut back
  (the extra columns cost a third more in the second GEMM; without them only the memory-efficient kernel
  applies).
- sinks and sliding windows (GPT-OSS): on a GPU, FlexAttention compiled: the window is block sparsity (a
  128-token window does T x 128 work, not T^2), key/value heads are shared without repeats, packed
  documents are one more mask term (no per-document loop), and a sink joins each softmax's denominator
  through the log-sum-exp flex returns: out_sink = out * sigmoid(lse - sink). Elsewhere, SDPA with a mask.
- packed documents: `varlen_attn` on a GPU in half precision (key/value heads repeated where the release's
  varlen_attn has no enable_gqa); one SDPA per document elsewhere.

None of the GPU paths has run on a GPU yet (benchmarks/gpu_check.sh checks each kernel's choice and speed).
The choices read a `Target` so that tests can fake a GPU.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)
"""Flash attention's kernels (SDPA's and FlexAttention's Triton ones) need Ampere or newer."""


@dataclass(frozen=True)
class Target:
    """What a kernel choice depends on: device kind, the dtype attention computes in, and the GPU."""

    device_type: str
    dtype: torch.dtype
    capability: Optional[tuple[int, int]] = None

    @staticmethod
    def of(t: Tensor) -> "Target":
        """Where `t` is and the dtype attention will compute it in (autocast's where it is on)."""
        device = t.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype
        capability = torch.cuda.get_device_capability(t.device) if t.is_cuda else None
        return Target(device, dtype, capability)

    def why_no_flash(self) -> Optional[str]:
        """Why no flash kernel runs here, or None."""
        if self.device_type != "cuda":
            return f"flash kernels run on GPUs, not {self.device_type}"
        if self.dtype not in HALF:
            return f"flash kernels take float16/bfloat16, not {self.dtype} (set train.dtype=bfloat16)"
        if self.capability is not None and self.capability < FLASH_MIN_CAPABILITY:
            return f"flash kernels need sm80 or newer, this GPU is sm{self.capability[0]}{self.capability[1]}"
        return None


def in_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on (kernels that are not autocast ops, and inputs
    that left a float32 RMSNorm: torch >= 2.12 runs rms_norm in float32 under CUDA autocast)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def mla_pads_values(target: Target) -> bool:
    """MLA pads its values to the query/key head size where that lets flash run."""
    return target.why_no_flash() is None


@functools.cache
def varlen_params() -> frozenset[str]:
    """The arguments this release's varlen_attn takes (empty: no varlen_attn). They changed between 2026
    releases: window_size replaced is_causal, enable_gqa and scale came later; document_attention adapts."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_release_limit() -> Optional[str]:
    """Why this release's varlen_attn cannot serve packed documents, or None. Without enable_gqa the key/value
    heads are repeated for it, without scale the queries are scaled: only a missing causal mode rules it out."""
    params = varlen_params()
    if not params:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if not {"window_size", "is_causal"} & params:
        return f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal"
    return None


def varlen_unsupported(target: Target) -> Optional[str]:
    """Why packed documents cannot take varlen_attn here, or None."""
    return target.why_no_flash() or varlen_release_limit()


@functools.cache
def flex_release_limit() -> Optional[str]:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention with AuxRequest (2.9 and later do)"
    return None


def flex_unsupported(target: Target) -> Optional[str]:
    """Why sinks and windows cannot take FlexAttention here, or None (on CPU it runs eagerly, without a
    backward: the masked SDPA serves there)."""
    return target.why_no_flash() or flex_release_limit()


def kernel_names(attention: str, sinks: bool, window: int, target: Target, documents: bool = True) -> list[str]:
    """One line per attention path this model takes on `target`, for the start-up log (`documents`: the
    run packs documents whose attention stays apart)."""
    fused = target.why_no_flash() is None
    if attention == "mla":
        lines = ["attention (MLA): SDPA " + ("flash, values padded to the query/key head size" if fused
                                              else f"(no flash: {target.why_no_flash()})")]
    elif sinks or window:
        why = flex_unsupported(target)
        lines = ["attention (sinks/window): " + ("FlexAttention, compiled (window as block sparsity, GQA "
                                                   "without repeats)" if why is None else
                                                   f"SDPA with a boolean mask ({why})")]
    else:
        lines = ["attention: SDPA " + ("flash" if fused else f"(no flash: {target.why_no_flash()})")]
    if documents and not sinks:  # a sliding-window model's full layers take the document path
        why = varlen_unsupported(target)
        lines.append("packed documents: " + ("varlen_attn, one call per micro-batch" if why is None
                                             else f"one SDPA per document ({why})"))
    return lines


@functools.cache
def warn_fallback(path: str, reason: str) -> None:
    """Say once per process that `path` runs its slower kernel on a GPU, and why."""
    warnings.warn(f"{path} falls back to a slower kernel on this GPU: {reason}", stacklevel=3)
