"""Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values from one small latent per token.

Each token is compressed to a latent c_kv of kv_lora_rank dims (normed), plus one rotated key part of
qk_rope_head_dim dims that every head shares; kv_b expands c_kv into per-head keys (qk_nope dims, no
position) and values (v dims). Queries come from a full projection or a rank-q_lora_rank bottleneck
with its own norm, each head split into a no-position part and a rotated part. Scores are
q_nope.k_nope + q_rope.k_rope over (qk_nope + qk_rope) dims, scaled by its inverse square root times
YaRN's mscale^2. Training runs the expanded form through the same SDPA / document kernels as GQA (the
absorbed form only pays off when decoding from a latent cache).

Shape legend (models/__init__.py): B, T, D, H heads, L latent (kv_lora_rank), Q = Z + Y query/key dims of a
head, Z of them without position (qk_nope), Y rotated (qk_rope), W value dims.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeyard.models.attention_kernels import Target, mla_pads_values
from moeyard.models.config import MLAConfig, RopeScalingConfig
from moeyard.models.document_attention import DocumentSpans, document_attention
from moeyard.models.layers import RMSNorm
from moeyard.models.rope import apply_rope, softmax_scale_factor
from moeyard.models.weight_steps import Linear


class LatentAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, mla: MLAConfig, rope_scaling: RopeScalingConfig) -> None:
        super().__init__()
        self.n_heads, self.mla = n_heads, mla
        qk_dim = mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.wq = Linear(dim, n_heads * qk_dim, bias=False)
        else:
            self.wq_a = Linear(dim, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, mla.latent_norm_eps)
            self.wq_b = Linear(mla.q_lora_rank, n_heads * qk_dim, bias=False)
        self.wkv_a = Linear(dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, mla.latent_norm_eps)
        self.wkv_b = Linear(mla.kv_lora_rank, n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.wo = Linear(n_heads * mla.v_head_dim, dim, bias=False)
        self.softmax_scale = qk_dim ** -0.5 * softmax_scale_factor(rope_scaling)

    def _queries(self, x_BTD: Tensor) -> Tensor:
        if self.mla.q_lora_rank is None:
            return self.wq(x_BTD)
        return self.wq_b(self.q_norm(self.wq_a(x_BTD)))

    def forward(self, x_BTD: Tensor, cos_TY: Tensor, sin_TY: Tensor, docs: Optional[DocumentSpans] = None) -> Tensor:
        """`docs` (packed examples): attention stays inside each document, still causal."""
        B, T, _ = x_BTD.shape
        H, m = self.n_heads, self.mla
        q_BHTQ = self._queries(x_BTD).view(B, T, H, m.qk_head_dim).transpose(1, 2)
        q_nope_BHTZ, q_rope_BHTY = q_BHTQ.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent_BTL, k_rope_BTY = self.wkv_a(x_BTD).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        k_nope_BHTZ, v_BHTW = self.wkv_b(self.kv_norm(latent_BTL)).view(B, T, H, -1).transpose(1, 2).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        q_rope_BHTY = apply_rope(q_rope_BHTY, cos_TY, sin_TY)
        k_rope_B1TY = apply_rope(k_rope_BTY.unsqueeze(1), cos_TY, sin_TY)
        q_BHTQ = torch.cat([q_nope_BHTZ, q_rope_BHTY], dim=-1)
        k_BHTQ = torch.cat([k_nope_BHTZ, k_rope_B1TY.expand(B, H, T, m.qk_rope_head_dim)], dim=-1)
        if docs is not None:
            out_BHTW = document_attention(q_BHTQ, k_BHTQ, v_BHTW, docs, scale=self.softmax_scale)
        else:
            out_BHTW = causal_attention(q_BHTQ, k_BHTQ, v_BHTW, self.softmax_scale, mla_pads_values(Target.of(q_BHTQ)))
        return self.wo(out_BHTW.transpose(1, 2).reshape(B, T, H * m.v_head_dim))


def causal_attention(q_BHTQ: Tensor, k_BHTQ: Tensor, v_BHTW: Tensor, scale: float, pad_values: bool) -> Tensor:
    """Causal SDPA with values narrower than queries and keys; `pad_values`: zero-pad them to Q dims so
    flash applies (models/attention_kernels.py), and cut the output back (zero columns change nothing else)."""
    W, Q = v_BHTW.shape[-1], q_BHTQ.shape[-1]
    if not pad_values or W >= Q:
        return F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTW, is_causal=True, scale=scale)
    padded = F.pad(v_BHTW, (0, Q - W))
    return F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, padded, is_causal=True, scale=scale)[..., :W]
