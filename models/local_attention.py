"""Causal attention with a sliding window and/or attention sinks (GPT-OSS).

A sliding window lets each token see itself and the `window - 1` tokens before it (transformers'
sliding_window). A sink is a learned logit per query head that joins every softmax's denominator and
contributes no value: attention mass can go "nowhere".

On a GPU in half precision: FlexAttention, compiled (`flex_local_attention`): the window and packed
documents are a block mask whose empty blocks are skipped, key/value heads stay shared, and the sink
rescales the output by its log-sum-exp. Never run on a GPU yet (benchmarks/gpu_check.sh checks it).

Elsewhere (CPU, the tests; or a GPU without it, with a warning): SDPA with a mask. SDPA has no sink
argument, so the sink is made a key: queries get one extra dim holding sink / scale, a key at the front has
1 there (and 0 elsewhere), the others 0, and its value is zero; its score is then exactly the sink, for
every query, while the other scores are unchanged. The key is shared by the kv heads, so grouped-query
attention stays grouped on CPU; on a GPU the kv heads are expanded and the head size padded to a multiple
of 8, so that SDPA can take the boolean [T, T + 1] mask in its memory-efficient kernel.

Shape legend (models/__init__.py): B, H query heads, J key/value heads, T, Q head dim, W value head dim.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moeyard.models.attention_kernels import Target, flex_unsupported, in_compute_dtype, warn_fallback
from moeyard.models.document_attention import DocumentSpans


def _allowed(T: int, window: int, sink: bool, device: torch.device) -> Tensor:
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed = allowed & (i - j < window)
    return torch.cat([allowed.new_ones(T, 1), allowed], dim=1) if sink else allowed


def _one_sequence(q_BHTQ: Tensor, k_BJTQ: Tensor, v_BJTW: Tensor, scale: float, window: int,
                  sinks_H: Optional[Tensor]) -> Tensor:
    B, H, T, Q = q_BHTQ.shape
    K = k_BJTQ.shape[1]
    if q_BHTQ.is_cuda and H != K:  # SDPA's fused kernels take a mask only without enable_gqa (pytorch#139586)
        k_BJTQ, v_BJTW = (t.repeat_interleave(H // K, dim=1) for t in (k_BJTQ, v_BJTW))
        K = H
    if sinks_H is not None:
        pad = -(Q + 1) % 8  # head sizes in multiples of 8 for the memory-efficient kernel; zeros change no score
        sink_BHT1 = (sinks_H / scale).to(q_BHTQ.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        q_BHTQ = F.pad(torch.cat([q_BHTQ, sink_BHT1], dim=-1), (0, pad))
        sink_key_BJ1Q = F.pad(k_BJTQ.new_ones(B, K, 1, 1), (Q, pad))
        k_BJTQ = torch.cat([sink_key_BJ1Q, F.pad(k_BJTQ, (0, 1 + pad))], dim=2)
        v_BJTW = torch.cat([v_BJTW.new_zeros(B, K, 1, v_BJTW.shape[-1]), v_BJTW], dim=2)
    mask = _allowed(T, window, sinks_H is not None, q_BHTQ.device)
    return F.scaled_dot_product_attention(q_BHTQ, k_BJTQ, v_BJTW, attn_mask=mask, scale=scale, enable_gqa=H != K)


def local_attention(q_BHTQ: Tensor, k_BJTQ: Tensor, v_BJTW: Tensor, *, scale: float, window: int = 0,
                    sinks_H: Optional[Tensor] = None, docs: Optional[DocumentSpans] = None) -> Tensor:
    """Causal attention, [B, H, T, V] out; `window` 0: no window; `docs`: each packed document on its own.
    FlexAttention where it runs fused (models/attention_kernels.py), else SDPA with a mask."""
    target = Target.of(q_BHTQ)
    why_not = flex_unsupported(target)
    if why_not is None:  # never run here: no GPU in CI (benchmarks/gpu_check.sh runs it)
        return flex_local_attention(q_BHTQ, k_BJTQ, v_BJTW, scale, window, sinks_H, docs)
    if target.device_type == "cuda":
        warn_fallback("sink/window attention (SDPA with a boolean mask, key/value heads repeated)", why_not)
    if docs is None:
        return _one_sequence(q_BHTQ, k_BJTQ, v_BJTW, scale, window, sinks_H)
    B, H, T, _ = q_BHTQ.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[-1]) for t in (q_BHTQ, k_BJTQ, v_BJTW)]
    parts = [_one_sequence(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, window,
                           sinks_H)[0].transpose(0, 1)
             for q, k, v in zip(*(t.split(docs.lengths) for t in flat))]
    return torch.cat(parts).view(B, T, H, -1).transpose(1, 2)


def flex_local_attention(q_BHTQ: Tensor, k_BJTQ: Tensor, v_BJTW: Tensor, scale: float, window: int,
                         sinks_H: Optional[Tensor], docs: Optional[DocumentSpans], compiled: bool = True) -> Tensor:
    """The same attention through FlexAttention: causal, window and documents as one block mask (blocks
    outside it are skipped), GQA as is, the sink applied from the log-sum-exp: with a sink s, softmax's
    denominator gains e^s, so out_sink = out * e^lse / (e^lse + e^s) = out * sigmoid(lse - s).
    `compiled` False: flex's eager reference (CPU tests; forward only there)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    B, H, T, _ = q_BHTQ.shape
    q_BHTQ, k_BJTQ, v_BJTW = in_compute_dtype(q_BHTQ, k_BJTQ, v_BJTW)  # flex is not an autocast op
    mask = _block_mask(B, T, window, docs, q_BHTQ.device, compiled)
    attend = _compiled_flex() if compiled else flex_attention
    out_BHTW, aux = attend(q_BHTQ, k_BJTQ, v_BJTW, block_mask=mask, scale=scale,
                           enable_gqa=H != k_BJTQ.shape[1], return_aux=AuxRequest(lse=True))
    if sinks_H is None:
        return out_BHTW
    keep_BHT = torch.sigmoid(aux.lse - sinks_H.float().view(1, H, 1))
    return (out_BHTW.float() * keep_BHT.unsqueeze(-1)).to(out_BHTW.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_MASKS: dict[tuple, object] = {}
"""Block masks by (rows, T, window, document lengths, device): layers share one per micro-batch and window."""


def _block_mask(B: int, T: int, window: int, docs: Optional[DocumentSpans], device: torch.device, compiled: bool):
    """Which (query, key) blocks to compute: causal, inside the window, inside one document. The document of
    each token comes from the spans' device offsets (no host copy); on a GPU the mask is built by a compiled
    kernel block by block, not as a dense [B, T, T] mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (B if docs is not None else None, T, window, docs.lengths if docs is not None else None, str(device))
    if key in _MASKS:
        return _MASKS[key]
    doc_BT = None
    if docs is not None:
        positions = torch.arange(B * T, device=device, dtype=docs.cu_seqlens.dtype)
        doc_BT = (torch.searchsorted(docs.cu_seqlens, positions, right=True) - 1).view(B, T)

    def allowed(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if window:
            keep = keep & (q_idx - kv_idx < window)
        if doc_BT is not None:
            keep = keep & (doc_BT[b, q_idx] == doc_BT[b, kv_idx])
        return keep

    if len(_MASKS) >= 16:
        _MASKS.pop(next(iter(_MASKS)))
    _MASKS[key] = create_block_mask(allowed, key[0], None, T, T, device=device, _compile=compiled)
    return _MASKS[key]
