"""The training step's loss: prompt tokens of an SFT row contribute nothing."""
from __future__ import annotations

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
