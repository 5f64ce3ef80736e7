"""Transformer and MoE layers as single-device computations."""
from moeyard.errors import ConfigError
from moeyard.models.config import ModelConfig, MoEConfig
from moeyard.models.moe.experts import GroupedExperts
from moeyard.models.moe.layer import MoE, MoEStats, TokenExchange
from moeyard.models.transformer import ModelOutput, Transformer, expert_parameter_ids, no_decay_parameter_ids

__all__ = [
    "ConfigError", "GroupedExperts", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEStats", "no_decay_parameter_ids",
    "TokenExchange", "Transformer", "expert_parameter_ids",
]
