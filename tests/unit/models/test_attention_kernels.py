"""Which kernel each attention path takes, with the GPU faked (none here), and the MLA padding's numerics."""
from __future__ import annotations

import pytest
import torch

from moeyard.models import attention_kernels
from moeyard.models.attention_kernels import Target, flex_unsupported, kernel_names, mla_pads_values, varlen_unsupported
from moeyard.models.latent_attention import causal_attention

H100 = Target("cuda", torch.bfloat16, (9, 0))


def test_fused_kernels_are_chosen_on_a_gpu_in_half_precision_and_refusals_say_why() -> None:
    assert mla_pads_values(H100) and flex_unsupported(H100) is None
    assert not mla_pads_values(Target("cpu", torch.float32))
    assert "float32" in Target("cuda", torch.float32, (9, 0)).why_no_flash()
    assert "sm75" in flex_unsupported(Target("cuda", torch.float16, (7, 5)))
    assert "GPUs" in varlen_unsupported(Target("cpu", torch.bfloat16))
    lines = kernel_names("mla", False, 0, H100)
    assert lines[0] == "attention (MLA): SDPA flash, values padded to the query/key head size"
    assert kernel_names("gqa", True, 128, H100) == [
        "attention (sinks/window): FlexAttention, compiled (window as block sparsity, GQA without repeats)"]
    assert kernel_names("gqa", True, 128, Target("cpu", torch.float32))[0].startswith(
        "attention (sinks/window): SDPA with a boolean mask (flash kernels run on GPUs")


def test_a_release_without_varlen_window_or_gqa_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_kernels, "varlen_release_limit", lambda: "torch 2.11's varlen_attn lacks ['window_size']")
    assert kernel_names("gqa", False, 0, H100)[1] == (
        "packed documents: one SDPA per document (torch 2.11's varlen_attn lacks ['window_size'])")
    monkeypatch.setattr(attention_kernels, "varlen_release_limit", lambda: None)
    assert kernel_names("gqa", False, 0, H100)[1] == "packed documents: varlen_attn, one call per micro-batch"


def test_document_attention_computes_in_the_autocast_dtype_when_qk_norm_left_q_in_float32() -> None:
    """On a GPU, torch >= 2.12 runs RMSNorm in float32 under autocast: q and k arrive float32, v bf16. The
    choice must see the compute dtype (bf16), not q's, or varlen_attn is skipped; faked here on CPU."""
    from moeyard.models.document_attention import DocumentSpans, document_attention

    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Target.of(q).dtype == torch.bfloat16
        out = document_attention(q, k, v, DocumentSpans.from_segments(torch.tensor([[0, 0, 0, 1, 1, 1]])))
    assert out.dtype == torch.bfloat16


def test_mla_values_padded_for_flash_compute_the_same_attention() -> None:
    """Zero value columns change no score and no other output column, forward and backward."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 12, generator=g), torch.randn(2, 3, 10, 12, generator=g)
    v = torch.randn(2, 3, 10, 8, generator=g)
    dy = torch.randn(2, 3, 10, 8, generator=g)
    results = []
    for pad in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = causal_attention(*inputs, 0.2, pad)
        assert out.shape == (2, 3, 10, 8)
        results.append([out, *torch.autograd.grad((out * dy).sum(), inputs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [
    frozenset({"window_size", "enable_gqa", "scale"}),  # torch 2.13
    frozenset({"is_causal"}),                            # an early 2026 release: no GQA, no scale
    frozenset({"window_size", "scale"})])
def test_varlen_call_adapts_to_the_release_and_computes_per_document_attention(monkeypatch, params) -> None:
    """The one varlen_attn call (GPU only) through a fake that takes only `params`, as each release does:
    heads repeated without enable_gqa, queries scaled without scale, MLA's values padded and cut back."""
    import torch.nn.attention.varlen as varlen_module
    import torch.nn.functional as F

    from moeyard.models import document_attention as module
    from moeyard.models.document_attention import DocumentSpans

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= params, f"{set(kwargs) - params} is not an argument of this release"
        assert kwargs.get("window_size", (-1, 0)) == (-1, 0) and kwargs.get("is_causal", True)
        bounds = cu_q.tolist()
        outs = [F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False)).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)

    monkeypatch.setattr(varlen_module, "varlen_attn", fake_varlen)
    monkeypatch.setattr(module, "varlen_params", lambda: params)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 2, 8, 12, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    spans = DocumentSpans.from_segments(torch.tensor([[0] * 3 + [1] * 5, [0] * 8]))
    flat = [t.transpose(1, 2).reshape(16, t.shape[1], t.shape[-1]) for t in (q, k, v)]
    got = module._varlen(*flat, spans, 0.2).view(2, 8, 4, 8).transpose(1, 2)
    torch.testing.assert_close(got, module.document_attention(q, k, v, spans, scale=0.2), rtol=1e-5, atol=1e-5)
