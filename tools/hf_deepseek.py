"""The DeepSeek-V3 family's config.json (`DeepseekV3ForCausalLM`: DeepSeek-V3/R1, Kimi-K2) <-> ModelConfig.

What it adds to the other families: multi-head latent attention, a sigmoid router whose expert biases
(e_score_correction_bias) only select, group-limited routing, a routed scaling factor, shared experts
of n_shared_experts x moe_intermediate_size, dense first layers of intermediate_size, and
num_nextn_predict_layers multi-token-prediction modules stored as the layers after the last (model.mtp_layers;
transformers does not run them). Keys whose meaning moeyard does not compute are refused by name.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig, MoEConfig
from moeyard.models.config import MLAConfig, SigmoidBiasSettings
from moeyard.tools.hf_rope import rope_from_hf, rope_to_hf


def refuse(family: str, hf: dict[str, Any], refusals: list[tuple[bool, str]]) -> None:
    for condition, what in refusals:
        if condition:
            raise ConfigError(f"{family} config: {what} is not supported by moeyard's model")


def router_refusals(hf: dict[str, Any]) -> list[tuple[bool, str]]:
    """What the DeepSeek-style families (deepseek_v3, glm4_moe) may set that moeyard's MoE does not compute."""
    return [
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu/SwiGLU)"),
        (hf.get("scoring_func", "sigmoid") != "sigmoid", f"scoring_func={hf.get('scoring_func')!r} (sigmoid only)"),
        (hf.get("topk_method", "noaux_tc") != "noaux_tc", f"topk_method={hf.get('topk_method')!r} (noaux_tc only)"),
        (hf.get("moe_layer_freq", 1) != 1, f"moe_layer_freq={hf.get('moe_layer_freq')}"),
        (hf.get("n_shared_experts") is None, "n_shared_experts=null (transformers builds one shared expert anyway)"),
    ]


def sigmoid_router_moe(hf: dict[str, Any]) -> MoEConfig:
    """The MoE of the DeepSeek-style families: a sigmoid router whose selection biases (e_score_correction_bias)
    only select, groups, a routed scale, shared experts of n_shared_experts x moe_intermediate_size."""
    shared = hf["n_shared_experts"]
    return MoEConfig(
        num_experts=hf.get("n_routed_experts", hf.get("num_local_experts")), top_k=hf["num_experts_per_tok"],
        ffn_dim=hf["moe_intermediate_size"], router="sigmoid_bias", renormalize=bool(hf.get("norm_topk_prob", True)),
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        sigmoid_bias=SigmoidBiasSettings(n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1),
        num_shared_experts=shared,
        shared_ffn_dim=hf["moe_intermediate_size"] * shared or None, first_dense_layers=hf.get("first_k_dense_replace")
        or 0, aux_loss_coef=1e-4, balance_loss="sequence", z_loss_coef=0.0,  # DeepSeek-V3: alpha = 1e-4, per sequence
    )


def deepseek_model_config(hf: dict[str, Any]) -> ModelConfig:
    refuse("deepseek_v3", hf, router_refusals(hf) + [
        (bool(hf.get("attention_bias")), "attention_bias=true (biases on q_a/kv_a/o projections)"),
        (hf.get("rope_interleave", True) is False, "rope_interleave=false (the rotated dims in halves; moeyard "
                                                    "imports DeepSeek-V3's interleaved pairs)")])
    theta, scaling = rope_from_hf(hf)
    n_heads = hf["num_attention_heads"]
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                    v_head_dim=hf.get("v_head_dim") or hf["qk_nope_head_dim"])
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=n_heads, head_dim=mla.qk_head_dim, attention="mla", mla=mla, ffn_dim=hf["intermediate_size"],
        max_seq_len=(hf.get("max_position_embeddings") or 4096), rope_theta=theta, rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), moe=sigmoid_router_moe(hf),
        mtp_layers=hf.get("num_nextn_predict_layers") or 0,
    )


def sigmoid_router_unexportable(cfg: ModelConfig) -> Optional[str]:
    """Why the DeepSeek-style families cannot compute this model's MoE, or None when they can."""
    m = cfg.moe
    if m.router != "sigmoid_bias":
        return f"model.moe.router={m.router} (DeepSeek-V3 and GLM-4.5 route with sigmoid_bias)"
    if m.every != 1:
        return f"model.moe.every={m.every} (MoE in every layer after the dense ones)"
    if m.num_shared_experts and m.shared_hidden_dim != m.ffn_dim * m.num_shared_experts:
        return "model.moe.shared_ffn_dim differs from ffn_dim * num_shared_experts"
    return None


def sigmoid_router_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, moe_intermediate_size=m.ffn_dim,
        num_hidden_layers=cfg.n_layers, n_shared_experts=m.num_shared_experts, n_routed_experts=m.num_experts,
        routed_scaling_factor=m.route_scale, n_group=m.sigmoid_bias.n_groups,
        topk_group=m.sigmoid_bias.topk_groups, num_experts_per_tok=m.top_k,
        first_k_dense_replace=m.first_dense_layers, norm_topk_prob=m.renormalize and m.top_k > 1, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, num_nextn_predict_layers=cfg.mtp_layers,
    )


def deepseek_exportable(cfg: ModelConfig) -> Optional[str]:
    """Why DeepseekV3ForCausalLM cannot compute this MLA model, or None when it can."""
    if reason := sigmoid_router_unexportable(cfg):
        return reason
    if cfg.mla.latent_norm_eps != 1e-6:
        return f"model.mla.latent_norm_eps={cfg.mla.latent_norm_eps} (DeepSeek-V3's latent norms use 1e-6)"
    return None


def deepseek_config_dict(cfg: ModelConfig, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    mla = cfg.mla
    return dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], **sigmoid_router_config_dict(cfg),
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim, rope_interleave=True, attention_bias=False,
        torch_dtype=str(dtype or torch.float32).removeprefix("torch."), **rope_to_hf(cfg),
    )
