"""The training step's loss: prompt tokens of an SFT row contribute nothing; the chunked loss equals the
whole one."""
from __future__ import annotations

import pytest
import torch
from helpers.sft_cases import sft_rows

from moeyard.trainer.step import lm_loss_sum


def test_prompt_tokens_contribute_zero_loss() -> None:
    tokens, mask, _ = sft_rows(seq_len=32, layout="pack")
    logits = torch.randn(*mask.shape, 264, requires_grad=True)
    targets = tokens[:, 1:]
    loss = lm_loss_sum(logits, targets, mask)
    loss.backward()
    grad_norm_per_position = logits.grad.norm(dim=-1)
    assert (grad_norm_per_position[~mask] == 0).all()
    assert (grad_norm_per_position[mask] > 0).all()
    changed = torch.where(mask, targets, (targets + 1) % 264)  # every prompt/padding target replaced
    assert lm_loss_sum(logits, changed, mask).item() == loss.item()
    assert 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("masked", [False, True], ids=["pretraining", "sft-mask"])
def test_chunked_loss_equals_the_whole_and_never_keeps_the_logits(masked: bool) -> None:
    """train.loss_chunk_tokens: the same loss and gradients as projecting every token at once, while nothing
    of the [tokens, vocab] logits is kept for backward (chunks of 7 tokens: not a divisor of the 30)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.trainer.step import MicroBatch, forward_and_loss

    cfg = ModelConfig(vocab_size=512, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(15) % 3 != 0).expand(2, 15) if masked else None

    def run(chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        kept = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_and_loss(model, MicroBatch(tokens, mask), torch.float32, chunk).lm_sum
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept[0]

    whole, grads, kept_whole = run(0)
    chunked, grads_chunked, kept_chunked = run(7)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_chunked[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    logits_bytes = 2 * 15 * 512 * 4
    assert kept_chunked < kept_whole - logits_bytes, "the chunked loss kept the logits for backward"
    assert torch.equal(run(64)[0], whole), "one chunk holding every token is the unchunked loss exactly"
