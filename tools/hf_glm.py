"""GLM-4.5's config.json (`Glm4MoeForCausalLM`: GLM-4.5, GLM-4.5-Air) <-> ModelConfig.

DeepSeek-V3's MoE (sigmoid router with selection biases, groups, routed scale, shared experts, dense first
layers, MTP modules stored as the layers after the last) under grouped-query attention with q/k/v biases,
optional per-head q/k RMSNorm (use_qk_norm) and partial rotary (partial_rotary_factor: the first part of
each head rotated, in halves; moeyard's rows are permuted to its pair layout as for the other families).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from moeyard.models import ModelConfig
from moeyard.tools.hf_deepseek import (
    refuse,
    router_refusals,
    sigmoid_router_config_dict,
    sigmoid_router_moe,
    sigmoid_router_unexportable,
)
from moeyard.tools.hf_rope import rope_from_hf, rope_to_hf, rotary_fraction


def glm_model_config(hf: dict[str, Any]) -> ModelConfig:
    refuse("glm4_moe", hf, router_refusals(hf))
    theta, scaling = rope_from_hf(hf, partial_ok=True)
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        attn_bias=bool(hf.get("attention_bias", False)), qk_norm="head" if hf.get("use_qk_norm") else "none",
        ffn_dim=hf["intermediate_size"], max_seq_len=(hf.get("max_position_embeddings") or 4096), rope_theta=theta,
        rope_scaling=scaling, rope_fraction=rotary_fraction(hf, default=0.5),  # Glm4MoeConfig's own default norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        moe=sigmoid_router_moe(hf), mtp_layers=hf.get("num_nextn_predict_layers") or 0,
    )


def glm_exportable(cfg: ModelConfig) -> Optional[str]:
    """Why Glm4MoeForCausalLM cannot compute this grouped-query model, or None when it can."""
    if reason := sigmoid_router_unexportable(cfg):
        return reason
    if cfg.qk_norm == "full":
        return "model.qk_norm=full (GLM-4.5 norms q and k per head)"
    return None


def glm_config_dict(cfg: ModelConfig, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    rope = rope_to_hf(cfg)
    rope["rope_parameters"]["partial_rotary_factor"] = rope["partial_rotary_factor"] = cfg.rope_dim / cfg.head_dim  # older readers: top level
    return dict(
        model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], **sigmoid_router_config_dict(cfg),
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        attention_bias=cfg.attn_bias, use_qk_norm=cfg.qk_norm == "head",
        torch_dtype=str(dtype or torch.float32).removeprefix("torch."), **rope,
    )
