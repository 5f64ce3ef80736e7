"""Attention's own settings: RoPE beyond its trained context, and multi-head latent attention; and the
check every config section uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from moeyard.errors import ConfigError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class RopeScalingConfig:
    """How RoPE reaches beyond the context it was trained at (models/rope.py)."""

    kind: Literal["none", "yarn"] = "none"
    """none: plain RoPE; yarn: YaRN (DeepSeek-V3, Kimi-K2, GPT-OSS)."""
    factor: float = 1.0
    """The context is this many times the original."""
    original_max_seq_len: int = 4096
    """The context the model was first trained at."""
    beta_fast: float = 32.0
    """Frequencies turning more than this often in the original context are kept as they are..."""
    beta_slow: float = 1.0
    """...those turning less often than this are divided by `factor`; a linear ramp between."""
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    """YaRN's magnitude terms as the published configs give them; with mscale_all_dim, MLA multiplies its
    softmax scale by (0.1 * mscale_all_dim * ln(factor) + 1)^2."""
    attention_factor: Optional[float] = None
    """cos and sin are multiplied by this; null: derived from factor (and mscale / mscale_all_dim)."""
    truncate: bool = True
    """Round the ramp's ends to whole dims (GPT-OSS sets false)."""

    def __post_init__(self) -> None:
        require(self.kind == "none" or self.factor >= 1,
                f"model.rope_scaling.factor={self.factor} must be >= 1 (it extends the context)")
        require(self.original_max_seq_len >= 1, "model.rope_scaling.original_max_seq_len must be >= 1")
        require(self.beta_fast >= self.beta_slow > 0,  # equal: a step, not a ramp (Kimi-K2 sets both to 1)
                f"model.rope_scaling.beta_fast={self.beta_fast} must be >= beta_slow={self.beta_slow} > 0")


@dataclass(kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values from one compressed latent per token,
    a RoPE part shared across heads (model.attention: mla)."""

    q_lora_rank: Optional[int] = None
    """Queries through a rank-r bottleneck with its own RMSNorm; null: one full projection (V2-Lite)."""
    kv_lora_rank: int = 64
    """The compressed latent of keys and values, the size a KV cache holds per token (with the RoPE key)."""
    qk_nope_head_dim: int = 32
    """Per head, the query/key dims without position."""
    qk_rope_head_dim: int = 16
    """Per head, the rotated dims; the key's are shared by all heads."""
    v_head_dim: int = 32
    latent_norm_eps: float = 1e-6
    """eps of the latents' RMSNorms (DeepSeek-V3 uses 1e-6 there whatever its rms_norm_eps)."""

    def __post_init__(self) -> None:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            require(getattr(self, key) >= 1, f"model.mla.{key}={getattr(self, key)} must be >= 1")
        require(self.q_lora_rank is None or self.q_lora_rank >= 1, "model.mla.q_lora_rank must be >= 1 or null")
        require(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
                f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
