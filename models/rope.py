"""Rotary position embeddings: the tables, their YaRN extension to longer contexts, and the rotation.

YaRN (Peng et al. 2023) keeps the fast-rotating frequencies (which see many turns within the original
context) and divides the slow ones by `factor`, with a linear ramp between; it scales cos and sin by an
attention factor (so q.k of the rotated part by its square), and DeepSeek's MLA further multiplies the
softmax scale by mscale(factor, mscale_all_dim)^2. The numbers follow the published models' configs
(`rope_parameters` with rope_type yarn), so an imported DeepSeek-V3 or GPT-OSS computes what it did.

Shape legend (models/__init__.py): T positions, Y rotated dims of a head (Y/2 frequencies).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from moeyard.models.config import RopeScalingConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times the original: 1 when not extended."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: RopeScalingConfig) -> float:
    """What cos and sin are multiplied by: given, or mscale/mscale_all_dim, or YaRN's default."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def softmax_scale_factor(scaling: RopeScalingConfig) -> float:
    """MLA's extra factor on the softmax scale (DeepSeek-V2/V3): mscale(factor, mscale_all_dim)^2."""
    if scaling.kind != "yarn" or not scaling.mscale_all_dim:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def _yarn_inv_freq(inv_freq: Tensor, rotary_dim: int, theta: float, s: RopeScalingConfig) -> Tensor:
    """Frequencies that turn fewer than beta_slow times in the original context are interpolated (divided
    by factor), those that turn more than beta_fast times kept, a linear ramp between."""
    def dim_for(turns: float) -> float:
        return rotary_dim * math.log(s.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(s.beta_fast), dim_for(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def rope_tables(rotary_dim: int, max_seq_len: int, theta: float,
                scaling: Optional[RopeScalingConfig] = None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [T, Y/2], computed in float32 for every position (YaRN's attention factor
    included)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    magnitude = 1.0
    if scaling is not None and scaling.kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, rotary_dim, theta, scaling)
        magnitude = attention_factor(scaling)
    angles_TY = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles_TY.cos() * magnitude, angles_TY.sin() * magnitude


def apply_rope(x_BHTY: Tensor, cos_TY: Tensor, sin_TY: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angle (the original RoFormer layout). Heads wider than
    the tables (model.rope_fraction < 1) have their first R dims rotated and the rest passed through."""
    T, R = x_BHTY.shape[-2], 2 * cos_TY.shape[-1]
    if R < x_BHTY.shape[-1]:
        return torch.cat([apply_rope(x_BHTY[..., :R], cos_TY, sin_TY), x_BHTY[..., R:]], dim=-1)
    if cos_TY.dim() == 2:  # a table by position; otherwise already per token, [B, 1, T, R/2]
        cos_TY, sin_TY = cos_TY[:T], sin_TY[:T]
    cos, sin = cos_TY.to(x_BHTY.dtype), sin_TY.to(x_BHTY.dtype)
    x_even, x_odd = x_BHTY[..., 0::2], x_BHTY[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2)
