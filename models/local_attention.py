"""Causal attention with a sliding window and/or attention sinks (GPT-OSS), through SDPA with a mask.

A sliding window lets each token see itself and the `window - 1` tokens before it (transformers'
sliding_window). A sink is a learned logit per query head that joins every softmax's denominator and
contributes no value: attention mass can go "nowhere". SDPA has no sink argument, so the sink is made a key:
queries get one extra dim holding sink / scale, a key at the front has 1 there (and 0 elsewhere), the others
0, and its value is zero; its score is then exactly the sink, for every query, while the other scores are
unchanged. The key is shared by the kv heads, so grouped-query attention stays grouped on CPU; on a GPU the
kv heads are expanded and the head size padded to a multiple of 8, so that SDPA can take the boolean
[T, T + 1] mask (the sink column always open) in its memory-efficient kernel. Never run on a GPU yet: if SDPA
falls back to its math kernel there, the [B, H, T, T + 1] scores are kept per layer.

Shape legend (models/__init__.py): B, H query heads, J key/value heads, T, Q head dim, W value head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

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
    """Causal attention, [B, H, T, V] out; `window` 0: no window; `docs`: each packed document on its own."""
    if docs is None:
        return _one_sequence(q_BHTQ, k_BJTQ, v_BJTW, scale, window, sinks_H)
    B, H, T, _ = q_BHTQ.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[-1]) for t in (q_BHTQ, k_BJTQ, v_BJTW)]
    parts = [_one_sequence(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, window,
                           sinks_H)[0].transpose(0, 1)
             for q, k, v in zip(*(t.split(docs.lengths) for t in flat))]
    return torch.cat(parts).view(B, T, H, -1).transpose(1, 2)
