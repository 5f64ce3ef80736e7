"""Multi-token prediction (model.mtp_layers): the loss against a hand-written reference, causality, and packed
documents computing what each document computes alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeyard.models import ModelConfig, MoEConfig, Transformer
from moeyard.trainer.step import MicroBatch, forward_and_loss


def _cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32,
                mtp_layers=2, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    return ModelConfig(**(base | overrides))


def _perturbed_model(cfg: ModelConfig) -> Transformer:
    """Norm gains away from 1 too, so a norm applied to the wrong tensor shows."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _reference_mtp_loss(model: Transformer, tokens_BT1: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 §2.2 written out: h^k_i = Block_k(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])), h^0 the
    last block's output; depth k's loss: the summed cross-entropy of t_{i+k+1}; the mean over depths."""
    inputs = tokens_BT1[:, :-1]
    T = inputs.shape[1]
    emb = model.tok_embeddings(inputs)
    h = emb
    for block in model.layers:
        h, _ = block(h, model.rope_cos, model.rope_sin)
    losses = []
    for k, m in enumerate(model.mtp, start=1):
        joined = torch.cat([m.enorm(emb[:, k:T]), m.hnorm(h[:, :T - k])], dim=-1)
        h, _ = m.block(m.eh_proj(joined), model.rope_cos, model.rope_sin)
        logits = model.output(m.norm(h))
        losses.append(F.cross_entropy(logits.flatten(0, 1), tokens_BT1[:, k + 1:].flatten(), reduction="sum"))
    return torch.stack(losses).mean()


def test_mtp_loss_equals_the_written_out_reference_and_is_off_unless_asked() -> None:
    cfg = _cfg()
    model = _perturbed_model(cfg)
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    loss = forward_and_loss(model, MicroBatch(tokens), torch.float32, mtp=True)
    out, lm_sum, mtp_sum = loss.out, loss.lm_sum, loss.mtp_sum
    expected = _reference_mtp_loss(model, tokens)
    torch.testing.assert_close(mtp_sum, expected, rtol=1e-5, atol=1e-5)
    assert [h.shape[1] for h in out.mtp_hidden] == [11, 10]
    assert sorted(out.moe_stats) == [0, 1, 2, 3]  # the MTP depths' MoE blocks report as blocks 2 and 3
    # The main loss does not change with MTP, and without asking there is no MTP forward.
    plain_loss = forward_and_loss(model, MicroBatch(tokens), torch.float32)
    plain, plain_lm, plain_mtp = plain_loss.out, plain_loss.lm_sum, plain_loss.mtp_sum
    assert plain_mtp is None and plain.mtp_hidden == () and sorted(plain.moe_stats) == [0, 1]
    torch.testing.assert_close(plain_lm, lm_sum, rtol=0, atol=0)
    # Chunked projection: the same sum.
    chunked = forward_and_loss(model, MicroBatch(tokens), torch.float32, loss_chunk_tokens=5, mtp=True).mtp_sum
    torch.testing.assert_close(chunked, mtp_sum, rtol=1e-6, atol=1e-5)


def test_depth_k_sees_no_token_after_i_plus_k() -> None:
    """Position i of depth k predicts t_{i+k+1}: changing that token (or any later one) leaves its logits alone."""
    cfg = _cfg()
    model = _perturbed_model(cfg)
    tokens = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(2))
    base = model(tokens[:, :-1], mtp=True).mtp_hidden
    i = 4
    for k in (1, 2):
        changed = tokens.clone()
        changed[0, i + k + 1:] = (changed[0, i + k + 1:] + 7) % 64
        after = model(changed[:, :-1], mtp=True).mtp_hidden[k - 1]
        torch.testing.assert_close(after[:, :i + 1], base[k - 1][:, :i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, i + 1:], base[k - 1][:, i + 1:])  # positions that see the change


def test_packed_documents_give_the_sum_of_each_alone() -> None:
    """With document masking a depth counts position i only while t_{i+k} is in i's document: a row packing
    documents A (7 tokens) and B (6) gives the MTP loss of A's row plus B's row."""
    cfg = _cfg(max_seq_len=16)
    model = _perturbed_model(cfg)
    row = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(3))
    segment = torch.tensor([[0] * 7 + [1] * 7])  # the last id is the target's (MicroBatch's segment_BT1)
    from moeyard.models.document_attention import DocumentSpans

    packed = MicroBatch(row, segment_BT1=segment, docs=DocumentSpans.from_segments(segment[:, :-1]))
    packed_sum = forward_and_loss(model, packed, torch.float32, mtp=True).mtp_sum
    a_sum = forward_and_loss(model, MicroBatch(row[:, :8]), torch.float32, mtp=True).mtp_sum
    b_sum = forward_and_loss(model, MicroBatch(row[:, 7:]), torch.float32, mtp=True).mtp_sum
    torch.testing.assert_close(packed_sum, a_sum + b_sum, rtol=1e-5, atol=1e-5)


def test_first_tokens_cuts_every_row() -> None:
    from moeyard.models.document_attention import DocumentSpans

    spans = DocumentSpans.from_segments(torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 6, 6]]))
    assert spans.first_tokens(6, 4).lengths == (3, 1, 4)
    assert spans.first_tokens(6, 4).cu_seqlens.tolist() == [0, 3, 4, 8]
    assert spans.first_tokens(6, 6).lengths == spans.lengths
