"""Causal attention inside each packed document, without a T x T mask.

A boolean [B, 1, T, T] mask rules out SDPA's flash and memory-efficient kernels: the math kernel then
materialises [B, H, T, T] scores (gigabytes at T = 8k). Instead the documents are given as spans of the
flattened [B*T] tokens, the layout of variable-length ("varlen") flash attention: on a GPU in half
precision one `varlen_attn` call covers them all; elsewhere each document runs its own causal SDPA, whose
memory grows with the document, not with T^2.

Shape legend (models/__init__.py): B, T, H query heads, J key/value heads, Q head dim, N = B*T tokens.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moeyard.models.attention_kernels import (
    Target,
    in_compute_dtype,
    varlen_params,
    varlen_unsupported,
    warn_fallback,
)
from moeyard.models.device_copy import to_device


@dataclass(frozen=True)
class DocumentSpans:
    """Packed documents of a batch: each row's documents back to back, rows one after another."""

    lengths: tuple[int, ...]
    """Tokens of each document, in flattened [B*T] order (a document never crosses a row)."""
    cu_seqlens: Tensor
    """int32 [documents + 1], on the model's device: where each document starts, then N."""

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @staticmethod
    def from_segments(segment_BT: Tensor, device: torch.device | None = None) -> "DocumentSpans":
        """From segment ids (equal ids next to each other are one document), with cu_seqlens on `device`
        (default: the ids' own). Ids on a GPU are read on the host: the batch builder passes host ids."""
        segment = segment_BT.cpu()
        starts_BT = torch.ones_like(segment, dtype=torch.bool)
        starts_BT[:, 1:] = segment[:, 1:] != segment[:, :-1]
        starts_N = starts_BT.reshape(-1).nonzero().squeeze(1)
        bounds = torch.cat([starts_N, torch.tensor([segment.numel()])])
        lengths = tuple(torch.diff(bounds).tolist())
        return DocumentSpans(lengths, to_device(bounds.to(torch.int32), device or segment_BT.device))

    def first_tokens(self, row_len: int, keep: int) -> "DocumentSpans":
        """The same documents with every row of `row_len` tokens cut to its first `keep`, from the host's
        lengths (multi-token prediction's depth k sees T - k positions)."""
        lengths: list[int] = []
        used = 0
        for n in self.lengths:
            if used < keep:
                lengths.append(min(n, keep - used))
            used = (used + n) % row_len
        bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        return DocumentSpans(tuple(lengths), to_device(bounds, self.cu_seqlens.device))


def document_attention(q_BHTQ: Tensor, k_BJTQ: Tensor, v_BJTQ: Tensor, spans: DocumentSpans,
                       scale: Optional[float] = None) -> Tensor:
    """Causal attention that stays inside each document; [B, H, T, V] out, like SDPA (`scale`: of the
    scores, default Q^-1/2; values may have their own head size V, as in MLA)."""
    B, H, T, Q = q_BHTQ.shape
    gqa = H != k_BJTQ.shape[1]
    target = Target.of(q_BHTQ)
    # q and k may come out of a float32 RMSNorm (qk_norm): all three in the compute dtype, as SDPA's autocast
    # rule casts them; the kernel choice reads that dtype, not q's.
    q_BHTQ, k_BJTQ, v_BJTQ = in_compute_dtype(q_BHTQ, k_BJTQ, v_BJTQ)
    q_NHQ, k_NJQ, v_NJQ = (t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[-1])
                           for t in (q_BHTQ, k_BJTQ, v_BJTQ))
    why_not = varlen_unsupported(target)
    if why_not is not None and target.device_type == "cuda":
        warn_fallback("packed-document attention (one SDPA per document)", why_not)
    if why_not is None:  # never run here: no GPU in CI (benchmarks/gpu_check.sh runs it)
        out_NHQ = _varlen(q_NHQ, k_NJQ, v_NJQ, spans, scale)
    else:
        parts = [
            F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True, enable_gqa=gqa, scale=scale)[0].transpose(0, 1)
            for q, k, v in zip(q_NHQ.split(spans.lengths), k_NJQ.split(spans.lengths), v_NJQ.split(spans.lengths))
        ]
        out_NHQ = torch.cat(parts)
    return out_NHQ.view(B, T, H, -1).transpose(1, 2)


def _varlen(q_NHQ: Tensor, k_NJQ: Tensor, v_NJW: Tensor, spans: DocumentSpans, scale: Optional[float]) -> Tensor:
    """One varlen_attn call over every document, as this release's varlen_attn takes its arguments
    (attention_kernels.varlen_params)."""
    from torch.nn.attention.varlen import varlen_attn

    params = varlen_params()
    H, J, Q = q_NHQ.shape[1], k_NJQ.shape[1], q_NHQ.shape[-1]
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if H != J and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif H != J:  # a release without enable_gqa: the key/value heads repeated for it
        k_NJQ, v_NJW = (t.repeat_interleave(H // J, dim=1) for t in (k_NJQ, v_NJW))
    if scale is not None and "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:  # a release without scale: its default is Q^-1/2
        q_NHQ = q_NHQ * (scale * Q ** 0.5)
    W = v_NJW.shape[-1]  # flash kernels want one head size: pad MLA's values with zeros, cut them off
    v_padded = F.pad(v_NJW, (0, Q - W)) if W < Q else v_NJW
    return varlen_attn(q_NHQ, k_NJQ, v_padded, spans.cu_seqlens, spans.cu_seqlens, spans.max_len, spans.max_len,
                       **kwargs)[..., :W]
