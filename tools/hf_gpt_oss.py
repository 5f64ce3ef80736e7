"""GPT-OSS's config.json and expert layout (`GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b) <-> moeyard.

What it adds: attention sinks, sliding-window layers alternating with full ones (layer_types), biases on
q/k/v/o, on the router and on every expert projection, the clamped SwiGLU (swiglu_limit, swiglu_alpha) of
(up + 1) * gate * sigmoid(alpha * gate), and a softmax over the top-k logits (= moeyard's renormalised
topk_softmax). Experts are stored fused: gate_up_proj [E, D, 2F] with gate and up interleaved by column,
down_proj [E, F, D], and biases [E, 2F] / [E, D]. The published weights are MXFP4 blocks and scales:
those are refused with how to dequantize them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig, MoEConfig
from moeyard.tools.hf_rope import rope_from_hf, rope_to_hf

LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def gpt_oss_model_config(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("quantization_config"):
        raise ConfigError(f"gpt_oss config: quantization_config={hf['quantization_config'].get('quant_method')!r} "
                          f"(MXFP4 weights): load it in transformers with Mxfp4Config(dequantize=True), "
                          f"save_pretrained it, and convert that folder")
    types = hf.get("layer_types") or [("sliding_attention", "full_attention")[i % 2]  # transformers' default
                                      for i in range(hf["num_hidden_layers"])]
    if unknown := set(types) - set(LAYER_TYPES):
        raise ConfigError(f"gpt_oss config: layer_types {sorted(unknown)} are not supported (sliding_attention, "
                          f"full_attention)")
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        raise ConfigError("gpt_oss config: no rope_parameters (transformers' default is YaRN x32 from 4096 "
                          "positions): write them into config.json so that the RoPE is explicit")
    theta, scaling = rope_from_hf(hf)
    bias = bool(hf.get("attention_bias", True))
    moe = MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                    ffn_dim=hf["intermediate_size"], router="topk_softmax", renormalize=True, router_bias=True,
                    expert_bias=True, activation="swiglu_clamped", swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                    swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.9)), z_loss_coef=0.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], head_dim=hf.get("head_dim") or 64,
        attn_bias=bias, attn_out_bias=bias, attention_sinks=True, sliding_window=hf.get("sliding_window") or 128,
        layer_types=[LAYER_TYPES[t] for t in types], ffn_dim=hf["intermediate_size"],
        max_seq_len=(hf.get("max_position_embeddings") or 4096), rope_theta=theta, rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), moe=moe,
    )


def gpt_oss_unexportable(cfg: ModelConfig) -> Optional[str]:
    """Why GptOssForCausalLM cannot compute this model, or None when it can."""
    m = cfg.moe
    wanted = [
        (m.router == "topk_softmax" and m.renormalize and m.top_k > 1, "a renormalised topk_softmax router with "
         "top_k > 1 (GPT-OSS gives a lone expert weight 1)"),
        (m.route_scale == 1.0, "model.moe.route_scale=1"),
        (cfg.rope_fraction == 1, "whole heads rotated (model.rope_fraction=1)"),
        (m.router_bias and m.expert_bias, "biases on the router and the experts"),
        (m.activation == "swiglu_clamped", "model.moe.activation=swiglu_clamped"),
        (cfg.attention_sinks, "attention sinks"),
        (cfg.attn_bias == cfg.attn_out_bias, "biases on all of q/k/v/o or none"),
        (cfg.qk_norm == "none", "no q/k norm"),
        (not m.num_shared_experts and m.first_dense_layers == 0 and m.every == 1, "MoE in every layer, no shared expert"),
    ]
    missing = [what for ok, what in wanted if not ok]
    return f"GPT-OSS needs {', '.join(missing)}" if missing else None


def gpt_oss_config_dict(cfg: ModelConfig, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    m = cfg.moe
    types = cfg.layer_types or ["sliding" if cfg.sliding_window else "full"] * cfg.n_layers
    return dict(
        model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        intermediate_size=m.ffn_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k, sliding_window=cfg.sliding_window or None,
        layer_types=[f"{t}_attention" for t in types], attention_bias=cfg.attn_bias, swiglu_alpha=m.swiglu_alpha,
        swiglu_limit=m.swiglu_limit, router_aux_loss_coef=m.aux_loss_coef, max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=str(dtype or torch.float32).removeprefix("torch."), **rope_to_hf(cfg),
    )


def expert_producers(hf: str, block: str) -> dict[str, Callable[[Any], Tensor]]:
    """moeyard's six expert tensors of one layer from GPT-OSS's fused, interleaved ones (`src.take(name)`)."""
    def column(name: str, part: int) -> Callable[[Any], Tensor]:
        return lambda src: src.take(f"{hf}.experts.{name}")[..., part::2].contiguous()
    ours = f"{block}.ffn.experts"
    return {f"{ours}.w_gate_EDF": column("gate_up_proj", 0), f"{ours}.w_up_EDF": column("gate_up_proj", 1),
            f"{ours}.w_down_EFD": lambda src: src.take(f"{hf}.experts.down_proj"),
            f"{ours}.b_gate_EF": column("gate_up_proj_bias", 0), f"{ours}.b_up_EF": column("gate_up_proj_bias", 1),
            f"{ours}.b_down_ED": lambda src: src.take(f"{hf}.experts.down_proj_bias")}


def expert_tensors(hf: str, block: str, read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """GPT-OSS's fused expert tensors of one layer from moeyard's (the inverse of expert_producers)."""
    ours = f"{block}.ffn.experts"

    def interleaved(gate: Tensor, up: Tensor) -> Tensor:
        return torch.stack([gate, up], dim=-1).flatten(-2).contiguous()
    yield f"{hf}.experts.gate_up_proj", interleaved(read(f"{ours}.w_gate_EDF"), read(f"{ours}.w_up_EDF"))
    yield f"{hf}.experts.gate_up_proj_bias", interleaved(read(f"{ours}.b_gate_EF"), read(f"{ours}.b_up_EF"))
    yield f"{hf}.experts.down_proj", read(f"{ours}.w_down_EFD").contiguous()
    yield f"{hf}.experts.down_proj_bias", read(f"{ours}.b_down_ED").contiguous()
