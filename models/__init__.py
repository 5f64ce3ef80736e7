"""Transformer and MoE layers as single-device computations."""
from .config import ConfigError, ModelConfig, MoEConfig
from .experts import GroupedExperts
from .moe import MoE, MoEStats, TokenExchange
from .transformer import ModelOutput, Transformer, expert_modules

__all__ = [
    "ConfigError", "GroupedExperts", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEStats",
    "TokenExchange", "Transformer", "expert_modules",
]
