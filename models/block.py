"""One decoder block: pre-norm attention (GQA or MLA) then pre-norm FFN (dense SwiGLU or MoE).

Shape legend (models/__init__.py): B, T, D.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from moeyard.models.config import ModelConfig
from moeyard.models.document_attention import DocumentSpans
from moeyard.models.latent_attention import LatentAttention
from moeyard.models.layers import Attention, RMSNorm, SwiGLU
from moeyard.models.moe.layer import MoE, MoEStats
from moeyard.models.recompute import selective_checkpoint


class Block(nn.Module):
    """`layer`: the block index, which decides dense or MoE (model.moe.first_dense_layers, every); indices from
    model.n_layers on are the MTP modules' blocks."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn: nn.Module = (
            LatentAttention(cfg.dim, cfg.n_heads, cfg.mla, cfg.rope_scaling) if cfg.attention == "mla"
            else Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, bias=cfg.attn_bias,
                           qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, out_bias=cfg.attn_out_bias,
                           sinks=cfg.attention_sinks, window=cfg.window_for_layer(layer)))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module = (MoE(cfg.dim, cfg.moe_for_layer(layer)) if cfg.is_moe_layer(layer)
                               else SwiGLU(cfg.dim, cfg.ffn_dim))
        self.selective = False
        """train.recompute=selective: the attention half keeps only its GEMM outputs (models/recompute.py)."""

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor,
                docs: Optional[DocumentSpans] = None) -> tuple[Tensor, MoEStats | None]:
        if self.selective:
            x_BTD, h_BTD = selective_checkpoint(self._attention, x_BTD, cos, sin, docs)
        else:
            x_BTD, h_BTD = self._attention(x_BTD, cos, sin, docs)
        if isinstance(self.ffn, MoE):
            y_BTD, stats = self.ffn(h_BTD)
            return x_BTD + y_BTD, stats
        return x_BTD + self.ffn(h_BTD), None

    def _attention(self, x_BTD: Tensor, cos: Tensor, sin: Tensor,
                   docs: Optional[DocumentSpans]) -> tuple[Tensor, Tensor]:
        """The residual stream after attention, and its normed copy for the FFN."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, docs)
        return x_BTD, self.ffn_norm(x_BTD)
