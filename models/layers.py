"""Dense transformer pieces: RMSNorm, grouped-query attention, SwiGLU (rotary embeddings: models/rope.py).

Shape legend (models/__init__.py): B, T, D, H query heads, J key/value heads, Q head dim, F.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeyard.models.document_attention import DocumentSpans, document_attention
from moeyard.models.local_attention import local_attention
from moeyard.models.recompute import selective_checkpoint
from moeyard.models.rope import apply_rope
from moeyard.models.weight_steps import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The weight in the input's dtype: FSDP's mixed precision gathers it in bf16 while the residual
        # stream stays float32 (models.transformer.residual_stream); mixed dtypes miss the fused kernel.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Causal grouped-query self-attention through scaled_dot_product_attention.

    Options of published models: biases on q/k/v (Qwen2) and on the output (GPT-OSS), RMSNorm of queries and
    keys before RoPE, per head (`qk_norm="head"`, Qwen3) or over all heads at once (`"full"`, OLMoE), and
    GPT-OSS's sliding window and attention sinks (models/local_attention.py).
    """

    offset_parameters = ("sinks",)
    """Additive offsets among its own parameters: zero at init, no weight decay (models.offset_parameter_ids)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool = False,
                 qk_norm: Literal["none", "head", "full"] = "none", norm_eps: float = 1e-5, out_bias: bool = False,
                 sinks: bool = False, window: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = Linear(dim, n_heads * head_dim, bias=bias)
        self.wk = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wv = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wo = Linear(n_heads * head_dim, dim, bias=out_bias)
        self.window = window
        """Sliding window (model.sliding_window on this layer): each token sees itself and window - 1 before."""
        if sinks:  # GPT-OSS: a learned logit per head in every softmax's denominator
            self.sinks = nn.Parameter(torch.zeros(n_heads))
        self.qk_norm = qk_norm
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(head_dim if per_head else n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim if per_head else n_kv_heads * head_dim, norm_eps)

    def forward(self, x_BTD: Tensor, cos_TQ: Tensor, sin_TQ: Tensor, docs: Optional[DocumentSpans] = None) -> Tensor:
        """`docs` (packed examples): attention stays inside each document, still causal."""
        B, T, _ = x_BTD.shape
        q, k = self.wq(x_BTD), self.wk(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTQ = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BJTQ = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTQ, k_BJTQ = self.q_norm(q_BHTQ), self.k_norm(k_BJTQ)
        v_BJTQ = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTQ = apply_rope(q_BHTQ, cos_TQ, sin_TQ)
        k_BJTQ = apply_rope(k_BJTQ, cos_TQ, sin_TQ)
        sinks_H = getattr(self, "sinks", None)
        if sinks_H is not None or self.window:
            out_BHTQ = local_attention(q_BHTQ, k_BJTQ, v_BJTQ, scale=self.head_dim ** -0.5, window=self.window,
                                       sinks_H=sinks_H, docs=docs)
        elif docs is not None:
            out_BHTQ = document_attention(q_BHTQ, k_BJTQ, v_BJTQ, docs)
        else:
            out_BHTQ = F.scaled_dot_product_attention(q_BHTQ, k_BJTQ, v_BJTQ, is_causal=True,
                                                      enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out_BHTQ.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """The dense FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = Linear(dim, hidden_dim, bias=False)
        self.w_up = Linear(dim, hidden_dim, bias=False)
        self.w_down = Linear(hidden_dim, dim, bias=False)
        self.selective = False
        """train.recompute=selective: keep the three GEMM outputs, run SiLU and the product again in backward."""

    def forward(self, x: Tensor) -> Tensor:
        return selective_checkpoint(self._mlp, x) if self.selective else self._mlp(x)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
