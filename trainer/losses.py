"""Token losses: summed cross-entropy of the next token, of the MTP depths' further tokens, projected whole
or a chunk of tokens at a time.

Every loss here is a *sum* over the counted targets; the step scales it by its global target count.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeyard.models.mtp import mtp_target_mask


def lm_loss_sum(logits_BTV: Tensor, targets_BT: Tensor, mask_BT: Optional[Tensor]) -> Tensor:
    """Summed next-token cross-entropy, over the masked targets only when a mask is given (SFT)."""
    losses = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    return losses.sum() if mask_BT is None else _masked_sum(losses, mask_BT.flatten())


def _masked_sum(losses_N: Tensor, mask_N: Tensor) -> Tensor:
    """Sum of the masked losses by a multiply, not a boolean index (whose output size waits for the host)."""
    return torch.where(mask_N, losses_N, 0.0).sum()


def _chunk_loss(output: nn.Module, h_ND: Tensor, targets_N: Tensor, mask_N: Optional[Tensor]) -> Tensor:
    losses = F.cross_entropy(output(h_ND).float(), targets_N, reduction="none")
    return losses.sum() if mask_N is None else _masked_sum(losses, mask_N)


def chunked_lm_loss_sum(output: nn.Module, hidden_BTD: Tensor, targets_BT: Tensor, mask_BT: Optional[Tensor],
                        chunk_tokens: int) -> Tensor:
    """lm_loss_sum of `output(hidden_BTD)`, projecting `chunk_tokens` tokens at a time: each chunk's logits
    are freed after its loss and recomputed in backward, so the [tokens, vocab] logits never exist whole."""
    h_ND, targets_N = hidden_BTD.flatten(0, 1), targets_BT.flatten()
    mask_N = None if mask_BT is None else mask_BT.flatten()
    parts = []
    for a in range(0, targets_N.numel(), chunk_tokens):
        args = (output, h_ND[a:a + chunk_tokens], targets_N[a:a + chunk_tokens],
                None if mask_N is None else mask_N[a:a + chunk_tokens])
        parts.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_loss(*args))
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def projected_loss_sum(output: nn.Module, hidden_BTD: Tensor, targets_BT: Tensor, mask_BT: Optional[Tensor],
                       chunk_tokens: int) -> Tensor:
    """lm_loss_sum of `output(hidden_BTD)`, whole or `chunk_tokens` at a time (> 0)."""
    if chunk_tokens > 0:
        return chunked_lm_loss_sum(output, hidden_BTD, targets_BT, mask_BT, chunk_tokens)
    return lm_loss_sum(output(hidden_BTD), targets_BT, mask_BT)


def mtp_loss_sum(output: nn.Module, mtp_hidden: tuple[Tensor, ...], tokens_BT1: Tensor, mask_BT: Optional[Tensor],
                 segment_BT: Optional[Tensor], chunk_tokens: int) -> Tensor:
    """The mean over MTP depths of each depth's summed loss: depth k (1..D) at position i predicts token
    i + k + 1 (models/mtp.py says which targets count)."""
    T = tokens_BT1.shape[1] - 1
    sums = [projected_loss_sum(output, h_BTD, tokens_BT1[:, k + 1:], mtp_target_mask(k, T, mask_BT, segment_BT),
                               chunk_tokens)
            for k, h_BTD in enumerate(mtp_hidden, start=1)]
    return torch.stack(sums).sum() / len(sums)
