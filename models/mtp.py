"""DeepSeek-V3's multi-token prediction (MTP): extra depths that each predict one token further ahead.

Depth k (1..D) at position i joins the previous depth's hidden state there (depth 0: the last decoder
block's output, before the final norm) with the embedding of token i+k, runs one block, and predicts
token i+k+1 through the shared output layer after its own norm. Causality is kept: position i sees tokens
up to i+k, which is what predicting i+k+1 allows. Depth k has T - k positions (the later ones have no
target); with packed documents a position counts only while token i+k is in its own document.

Shape legend (models/__init__.py): B, T, D.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moeyard.models.block import Block
from moeyard.models.config import ModelConfig
from moeyard.models.document_attention import DocumentSpans
from moeyard.models.layers import RMSNorm
from moeyard.models.moe.layer import MoEStats
from moeyard.models.weight_steps import Linear


class MTPModule(nn.Module):
    """One depth: enorm(embedding) and hnorm(hidden) concatenated, projected back to D (eh_proj), a block,
    then `norm` before the shared output layer (DeepSeek-V3's names: enorm, hnorm, eh_proj, shared_head.norm)."""

    def __init__(self, cfg: ModelConfig, block_index: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, block_index)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_BTD: Tensor, emb_BTD: Tensor, cos: Tensor, sin: Tensor,
                docs: Optional[DocumentSpans] = None) -> tuple[Tensor, Tensor, MoEStats | None]:
        """The depth's hidden state (the next depth's input), the same normed for the output layer, and its
        MoE statistics (one call: under FSDP the module is one unit, gathered for its forward only)."""
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        h_BTD, stats = self.block(x_BTD, cos, sin, docs)
        return h_BTD, self.norm(h_BTD), stats


def depth_inputs(k: int, h_BTD: Tensor, emb_BTD: Tensor, cos: Tensor, sin: Tensor,
                 docs: Optional[DocumentSpans]) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[DocumentSpans]]:
    """Depth k's inputs from the previous depth's hidden state (T - k + 1 positions) and the whole
    sequence's embeddings, rope tables (a table [max_len, R/2] or per token [B, 1, T, R/2]) and documents."""
    T = emb_BTD.shape[1]
    keep = T - k
    if cos.dim() == 4:
        cos, sin = cos[:, :, :keep], sin[:, :, :keep]
    return (h_BTD[:, :keep], emb_BTD[:, k:], cos, sin,
            None if docs is None else docs.first_tokens(T, keep))


def mtp_target_mask(k: int, T: int, mask_BT: Optional[Tensor], segment_BT: Optional[Tensor]) -> Optional[Tensor]:
    """Which of depth k's T - k targets count: where the main loss's target k places later counts (SFT
    masks) and token i+k is still in position i's document. None: all."""
    valid = None if mask_BT is None else mask_BT[:, k:]
    if segment_BT is not None:
        same_doc = segment_BT[:, :T - k] == segment_BT[:, k:]
        valid = same_doc if valid is None else valid & same_doc
    return valid
