"""Hugging Face `config.json` <-> moeyard `ModelConfig`, for the families moeyard reads and writes.

MoE families: mixtral, qwen2_moe (shared expert behind a sigmoid gate, q/k/v biases), qwen3_moe
(per-head q/k norm, free head_dim), olmoe (q/k norm over all heads), deepseek_v3 (hf_deepseek.py), glm4_moe
(hf_glm.py). Dense families, read for
upcycling: llama, mistral, qwen2, qwen3. Reading needs no transformers; anything these files may say
that moeyard's model does not compute (rope scaling other than YaRN, sliding windows, other activations, extra biases)
is refused with the key that says it, rather than converted into a model that computes something else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig, MoEConfig
from moeyard.tools.hf_deepseek import deepseek_config_dict, deepseek_exportable, deepseek_model_config
from moeyard.tools.hf_glm import glm_config_dict, glm_exportable, glm_model_config
from moeyard.tools.hf_gpt_oss import gpt_oss_config_dict, gpt_oss_model_config, gpt_oss_unexportable
from moeyard.tools.hf_rope import rope_from_hf, rope_to_hf

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")
SIGMOID_ROUTER_FAMILIES = ("deepseek_v3", "glm4_moe")
"""DeepSeek-V3's MoE: selection biases, shared_experts, MTP modules stored as the layers after the last."""
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} has no config.json: pass a folder written by save_pretrained")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def _get(hf: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def _refuse(hf: dict[str, Any], family: str) -> None:
    def no(condition: bool, what: str) -> None:
        if condition:
            raise ConfigError(f"{family} config: {what} is not supported by moeyard's model")

    no(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu/SwiGLU)")
    no(bool(hf.get("use_sliding_window")), "use_sliding_window=true")
    window = hf.get("sliding_window")
    longest = _get(hf, "max_position_embeddings", default=0)
    no(family in ("mixtral", "mistral") and window is not None and window < longest,
       f"sliding_window={window} below max_position_embeddings")
    no(family in ("llama", "qwen3", "qwen3_moe", "olmoe") and bool(hf.get("attention_bias")),
       "attention_bias=true (a bias on the output projection)")
    no(bool(hf.get("mlp_bias")), "mlp_bias=true")
    no(hf.get("clip_qkv") is not None, f"clip_qkv={hf.get('clip_qkv')}")


def _moe_layers(hf: dict[str, Any], n_layers: int) -> tuple[int, int]:
    """(first_dense_layers, every) reproducing Qwen's mlp_only_layers / decoder_sparse_step pattern."""
    step = hf.get("decoder_sparse_step") or 1
    mlp_only = set(hf.get("mlp_only_layers") or [])
    sparse = [i not in mlp_only and (i + 1) % step == 0 for i in range(n_layers)]
    for first in range(n_layers):
        for every in range(1, n_layers + 1):
            if sparse == [i >= first and (i - first) % every == 0 for i in range(n_layers)]:
                return first, every
    raise ConfigError(f"MoE layers {[i for i, s in enumerate(sparse) if s]} (mlp_only_layers={sorted(mlp_only)}, "
                      f"decoder_sparse_step={step}) do not follow moeyard's first_dense_layers/every pattern")


SAME_AS = {"kimi_k2": "deepseek_v3"}
"""model_types whose custom code computes a family moeyard reads (Kimi-K2: DeepseekV3ForCausalLM's
architecture and tensor names); such a checkpoint exports back as that family, which transformers loads."""


POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "max_position_embeddings", "head_dim", "n_routed_experts", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq", "decoder_sparse_step", "n_group",
            "topk_group")
NON_NEGATIVE = ("shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                "num_nextn_predict_layers", "sliding_window")
"""config.json keys that hold a count: an integer (or null) before anything is computed from them."""
REALS = ("rope_theta", "rms_norm_eps", "router_aux_loss_coef", "initializer_range", "routed_scaling_factor")


def _check_values(hf: dict[str, Any]) -> None:
    """Types first: a string, a list or a float where a count goes is named here, not a TypeError later."""
    for keys, least in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for key in keys:
            value = hf.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ConfigError(f"config.json: {key}={value!r} must be an integer >= {least}")
    for key in REALS:
        value = hf.get(key)
        if key in hf and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ConfigError(f"config.json: {key}={value!r} must be a number")
    if not isinstance(hf.get("model_type"), str):
        raise ConfigError(f"config.json: model_type={hf.get('model_type')!r} must name the model's family")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if hf.get(key) is None:
            raise ConfigError(f"config.json: {key} is missing or null; save the model again with save_pretrained")


def family_of(hf: dict[str, Any], allowed: tuple[str, ...]) -> str:
    if not isinstance(hf, dict):
        raise ConfigError("config.json does not hold a JSON object: save the model again with save_pretrained")
    _check_values(hf)
    family = SAME_AS.get(hf.get("model_type"), hf.get("model_type"))
    if family not in allowed:
        raise ConfigError(f"config.json model_type={family!r}: expected one of {', '.join(allowed)}")
    return family


def model_config_from_hf(hf: dict[str, Any], family: str, moe: MoEConfig) -> ModelConfig:
    """The attention/embedding part common to every family, with `moe` for the MoE blocks."""
    _refuse(hf, family)
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    n_heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=_get(hf, "num_key_value_heads", default=n_heads), head_dim=hf.get("head_dim"),
        attn_bias=family == "qwen2" or (family == "qwen2_moe" and hf.get("qkv_bias", True)), qk_norm=qk_norm,
        ffn_dim=hf["intermediate_size"], max_seq_len=_get(hf, "max_position_embeddings", default=4096),
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        moe=moe,
    )


def moe_model_config(hf: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of an HF MoE checkpoint's config.json."""
    family = family_of(hf, MOE_FAMILIES)
    for key, names in (("num_experts_per_tok", ("num_experts_per_tok",)),
                       ("the expert count", ("num_local_experts", "num_experts", "n_routed_experts"))):
        if _get(hf, *names) is None:
            raise ConfigError(f"{family} config.json: {key} ({' or '.join(names)}) is missing or null")
    if hf["num_experts_per_tok"] == 1 and (family in ("mixtral", "gpt_oss") or
                                       hf.get("norm_topk_prob", family in SIGMOID_ROUTER_FAMILIES)):
        raise ConfigError(f"{family} config: num_experts_per_tok=1 with renormalised weights (every token's weight "
                          f"is 1) is not supported: moeyard's top-1 keeps the router probability")
    if family == "deepseek_v3":
        return family, deepseek_model_config(hf)
    if family == "glm4_moe":
        return family, glm_model_config(hf)
    if family == "gpt_oss":
        return family, gpt_oss_model_config(hf)
    first, every = _moe_layers(hf, hf["num_hidden_layers"]) if family in ("qwen2_moe", "qwen3_moe") else (0, 1)
    shared = hf.get("shared_expert_intermediate_size") or 0 if family == "qwen2_moe" else 0
    moe = MoEConfig(
        num_experts=_get(hf, "num_local_experts", "num_experts"), top_k=hf["num_experts_per_tok"],
        ffn_dim=_get(hf, "moe_intermediate_size", "intermediate_size"),
        renormalize=family == "mixtral" or bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_coef=0.0,
        num_shared_experts=1 if shared else 0, shared_ffn_dim=shared or None, shared_expert_gate=bool(shared),
        first_dense_layers=first, every=every,
    )
    return family, model_config_from_hf(hf, family, moe)


def export_family(cfg: ModelConfig) -> str:
    """The HF family that computes exactly what this moeyard model computes, or a ConfigError why none does."""
    m = cfg.moe

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise ConfigError(f"no Hugging Face family computes this model: {what}")

    need(cfg.peft.method != "lora", "it has LoRA adapters (model.peft.method=lora): fold them into the base "
         "weights first with `moeyard convert merge-adapters CKPT --out MERGED`, then export MERGED")
    need(cfg.peft.method == "none", f"it has routed adapters (model.peft.method={cfg.peft.method}); routed "
         f"adapters cannot be merged into the base weights, so export the base checkpoint instead")
    need(m.num_experts_per_layer is None, "model.moe.num_experts_per_layer differs between layers (HF MoE "
         "families have one expert count)")
    need(m.capacity_factor is None, "model.moe.capacity_factor is set (HF models are dropless)")
    if cfg.attention == "mla":
        reason = deepseek_exportable(cfg)
        need(reason is None, f"{reason}")
        return "deepseek_v3"
    if cfg.attention_sinks or m.expert_bias or m.router_bias or m.activation != "swiglu":
        reason = gpt_oss_unexportable(cfg)
        need(reason is None, f"{reason}")
        return "gpt_oss"
    need(not (cfg.sliding_window or cfg.attn_out_bias), "a sliding window or an output bias without GPT-OSS's "
         "sinks and biases")
    if m.router == "sigmoid_bias":
        reason = glm_exportable(cfg)
        need(reason is None, f"{reason}")
        return "glm4_moe"
    need(cfg.rope_fraction == 1, f"model.rope_fraction={cfg.rope_fraction} (only GLM-4.5 rotates part of a head)")
    need(m.router == "topk_softmax", f"model.moe.router={m.router} (only topk_softmax exists there)")
    need(m.route_scale == 1.0, f"model.moe.route_scale={m.route_scale} (only DeepSeek-V3 scales routed weights)")
    if cfg.qk_norm == "full":
        need(not m.num_shared_experts and not cfg.attn_bias and m.first_dense_layers == 0 and m.every == 1,
             "OLMoE has q/k norm over all heads, no shared expert, no biases, and MoE in every layer")
        need(cfg.head_dim * cfg.n_heads == cfg.dim, "OLMoE needs head_dim * n_heads == dim")
        return "olmoe"
    if cfg.qk_norm == "head":
        need(not m.num_shared_experts and not cfg.attn_bias, "Qwen3-MoE has no shared expert and no biases")
        return "qwen3_moe"
    need(cfg.head_dim * cfg.n_heads == cfg.dim, "head_dim * n_heads != dim needs q/k norm (Qwen3-MoE)")
    if (m.renormalize and m.top_k > 1 and not m.num_shared_experts and not cfg.attn_bias and m.first_dense_layers == 0
            and m.every == 1):
        return "mixtral"
    return "qwen2_moe"  # shared expert optional (a zero-width one stands in), biases optional, dense layers


def hf_config_dict(cfg: ModelConfig, family: str, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """config.json keys for `family` (transformers fills the rest with its defaults); `dtype`: the weights'
    (float32 when None)."""
    m = cfg.moe
    if family == "deepseek_v3":
        return deepseek_config_dict(cfg, dtype)
    if family == "glm4_moe":
        return glm_config_dict(cfg, dtype)
    if family == "gpt_oss":
        return gpt_oss_config_dict(cfg, dtype)
    common = dict(
        model_type=family, architectures=[ARCHITECTURES[family]], vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        **rope_to_hf(cfg), tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.aux_loss_coef, initializer_range=cfg.init_std,
        torch_dtype=str(dtype or torch.float32).removeprefix("torch."),
    )
    if family == "mixtral":
        return {**common, "num_local_experts": m.num_experts, "intermediate_size": m.ffn_dim, "sliding_window": None}
    if family == "olmoe":
        return {**common, "num_experts": m.num_experts, "intermediate_size": m.ffn_dim,
                "norm_topk_prob": m.renormalize and m.top_k > 1, "clip_qkv": None}
    sparse = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
    qwen = {**common, "num_experts": m.num_experts, "moe_intermediate_size": m.ffn_dim,
            "intermediate_size": cfg.ffn_dim, "norm_topk_prob": m.renormalize and m.top_k > 1, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, s in enumerate(sparse) if not s], "use_sliding_window": False}
    if family == "qwen3_moe":
        return {**qwen, "attention_bias": False}
    return {**qwen, "qkv_bias": cfg.attn_bias, "shared_expert_intermediate_size": m.shared_hidden_dim}
