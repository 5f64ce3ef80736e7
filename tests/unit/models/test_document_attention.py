"""Packed-document attention without a T x T mask equals SDPA under the boolean document mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeyard.models.document_attention import DocumentSpans, document_attention


def _masked_reference(q, k, v, segment_BT):
    T = segment_BT.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (segment_BT[:, :, None] == segment_BT[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=True)


def test_spans_follow_segment_changes_and_rows() -> None:
    spans = DocumentSpans.from_segments(torch.tensor([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]]))
    assert spans.lengths == (2, 3, 1, 6) and spans.max_len == 6
    assert spans.cu_seqlens.tolist() == [0, 2, 5, 6, 12] and spans.cu_seqlens.dtype == torch.int32


def test_document_attention_matches_the_masked_kernel_forward_and_backward() -> None:
    torch.manual_seed(0)
    B, H, K, T, Q = 2, 4, 2, 24, 8
    segment = torch.tensor([[1] * 5 + [2] * 11 + [0] * 8, [7] * 24])
    q, k, v = (torch.randn(B, n, T, Q, requires_grad=True) for n in (H, K, K))
    dy = torch.randn(B, H, T, Q)
    out = document_attention(q, k, v, DocumentSpans.from_segments(segment))
    grads = torch.autograd.grad((out * dy).sum(), (q, k, v))
    ref = _masked_reference(q, k, v, segment)
    ref_grads = torch.autograd.grad((ref * dy).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
