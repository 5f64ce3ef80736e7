"""RoPE settings of an HF config.json <-> moeyard's rope_theta and model.rope_scaling.

transformers 5 writes `rope_parameters` (rope_type, rope_theta, and YaRN's terms); older files write
`rope_theta` beside a `rope_scaling` dict whose kind is under `type` or `rope_type`. Plain and YaRN
RoPE are computed; any other kind (linear, dynamic, llama3, longrope) is refused by name.
"""
from __future__ import annotations

from typing import Any

from moeyard.errors import ConfigError
from moeyard.models.config import ModelConfig, RopeScalingConfig


def _params(hf: dict[str, Any]) -> dict[str, Any]:
    return {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


def rotary_fraction(hf: dict[str, Any], default: float = 1.0) -> float:
    """partial_rotary_factor: the share of each head that is rotated (`default` when config.json is silent:
    the family's modeling code's own default)."""
    return float(_params(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", default)))


def rope_from_hf(hf: dict[str, Any], partial_ok: bool = False) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, rope_scaling) of an HF config. `partial_ok`: the family's modeling code honours
    partial_rotary_factor (GLM-4.5), read by rotary_fraction; elsewhere anything but 1 is refused."""
    params = _params(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not partial_ok and rotary_fraction(hf) != 1.0:
        raise ConfigError(f"partial_rotary_factor={rotary_fraction(hf)} is not supported by this family's import: "
                          f"its modeling code rotates whole heads")
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind != "yarn":
        raise ConfigError(f"rope scaling {params} (rope_type={kind!r}) is not supported: moeyard computes plain "
                          f"RoPE and YaRN; convert a checkpoint without that rope_scaling")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"rope scaling {params}: YaRN needs original_max_position_embeddings (the context the "
                          f"model was first trained at); add it to config.json")
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    return theta, RopeScalingConfig(
        kind="yarn", factor=float(factor), original_max_seq_len=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)))


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's rope keys for the model's RoPE."""
    s = cfg.rope_scaling
    if s.kind == "none":
        params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        params = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": s.factor,
                  "original_max_position_embeddings": s.original_max_seq_len, "beta_fast": s.beta_fast,
                  "beta_slow": s.beta_slow, "truncate": s.truncate}
        params.update({k: v for k, v in (("mscale", s.mscale), ("mscale_all_dim", s.mscale_all_dim),
                                         ("attention_factor", s.attention_factor)) if v is not None})
    return {"rope_theta": cfg.rope_theta, "rope_parameters": params}
