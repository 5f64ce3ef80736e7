"""GPT-OSS's attention: sliding window and sinks, against a hand-worked case and the formula written out."""
from __future__ import annotations

import math

import torch

from moeyard.models.document_attention import DocumentSpans
from moeyard.models.local_attention import local_attention


def test_hand_worked_window_and_sink() -> None:
    """All scores 0 (keys are 0), a sink of ln 2, window 2, values 1, 2, 4: token 0 sees itself and the sink,
    1/(1 + 2) * 1; token 1 sees tokens 0 and 1, (1 + 2)/(1 + 1 + 2); token 2 only 1 and 2 (the window),
    (2 + 4)/4."""
    q = torch.ones(1, 1, 3, 2)
    k = torch.zeros(1, 1, 3, 2)
    v = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1)
    out = local_attention(q, k, v, scale=1.0, window=2, sinks_H=torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(out.flatten(), torch.tensor([1 / 3, 0.75, 1.5]))


def _reference(q, k, v, scale, window, sinks_H):
    """Softmax over [scores within the causal window, the head's sink], the sink's share dropped."""
    B, H, T, _ = q.shape
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks_H is not None:
        scores = torch.cat([scores, sinks_H.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    probs = scores.softmax(dim=-1)[..., :T]
    return probs @ v


def test_grouped_query_window_and_sinks_match_the_formula_and_documents_stay_apart() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 6, generator=g)
    sinks = torch.randn(4, generator=g, requires_grad=True)
    for window, with_sinks in ((0, True), (3, False), (3, True)):
        s = sinks if with_sinks else None
        got = local_attention(q, k, v, scale=0.3, window=window, sinks_H=s)
        torch.testing.assert_close(got, _reference(q, k, v, 0.3, window, s), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    expected_grad = torch.autograd.grad(_reference(q, k, v, 0.3, 3, sinks).sum(), sinks)[0]
    torch.testing.assert_close(sinks.grad, expected_grad, rtol=1e-5, atol=1e-6)
    # Two packed documents per row (5 + 4 tokens): each computes what it computes alone.
    docs = DocumentSpans.from_segments(torch.tensor([[0] * 5 + [1] * 4] * 2))
    packed = local_attention(q, k, v, scale=0.3, window=3, sinks_H=sinks, docs=docs)
    for a, b in ((0, 5), (5, 9)):
        alone = local_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.3, window=3, sinks_H=sinks)
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-5, atol=1e-6)


def test_offsets_start_at_zero_and_take_no_weight_decay() -> None:
    """GPT-OSS's biases (2-D per expert, too), router bias and sinks: zero at init and outside AdamW's decayed
    groups, like norm gains; every matrix decays."""
    from types import SimpleNamespace

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel.parallelize import adamw

    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, attn_bias=True, attn_out_bias=True,
                      attention_sinks=True, sliding_window=4, layer_types=["sliding", "full"],
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=8, router_bias=True, expert_bias=True,
                                    activation="swiglu_clamped"))
    model = Transformer(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    offsets = [n for n in names.values() if n.endswith((".bias", ".bias_E", ".sinks")) or ".b_" in n]
    assert {n.rsplit(".", 1)[-1] for n in offsets} == {"bias", "bias_E", "sinks", "b_gate_EF", "b_up_EF", "b_down_ED"}
    assert all(not dict(model.named_parameters())[n].any() for n in offsets)
    settings = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, moment_dtype="float32")
    decayed = {names[id(p)] for g in adamw(model, settings).param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & set(offsets)
    assert decayed == {n for n, p in model.named_parameters() if p.dim() >= 2 and n not in offsets}


def test_flex_path_matches_the_formula_with_documents_windows_sinks_and_shared_heads() -> None:
    """The GPU's FlexAttention path (here flex's eager reference, forward only: flex has no CPU backward):
    the window, the documents and causality as one block mask, the sink from the log-sum-exp."""
    from moeyard.models.local_attention import flex_local_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    sinks = torch.randn(4, generator=g)
    for window, s in ((0, sinks), (3, None), (3, sinks)):
        got = flex_local_attention(q, k, v, 0.3, window, s, None, compiled=False)
        torch.testing.assert_close(got, _reference(q, k, v, 0.3, window, s), rtol=1e-5, atol=1e-5)
    docs = DocumentSpans.from_segments(torch.tensor([[0] * 7 + [1] * 5, [0] * 3 + [1] * 9]))
    got = flex_local_attention(q, k, v, 0.3, 3, sinks, docs, compiled=False)
    torch.testing.assert_close(got, local_attention(q, k, v, scale=0.3, window=3, sinks_H=sinks, docs=docs),
                               rtol=1e-5, atol=1e-5)
