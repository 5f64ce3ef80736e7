"""Transformer and MoE layers as single-device computations.

Shape legend, the one every module of moeyard uses: a tensor's name ends in its dims, in order (x_BTD is
[batch, position, model dim]); a module's docstring names the letters it uses, with this meaning.

    B sequences of a batch          T positions in a sequence        N tokens (B*T, or any flat set)
    D model dim                     F hidden dim of an FFN (dense, shared or one expert)
    V vocabulary                    O output features of an adapted linear map
    H query heads                   J key/value heads                Q query/key dims of a head
    W value dims of a head          Y rotated (RoPE) dims of a head  Z un-rotated query/key dims (MLA)
    L latent dims (MLA)             R rank of a LoRA adapter
    E experts (a rank's local ones where the module says so)          K experts (or adapters) per token
    S token copies grouped by expert                    C token copies in another order (as routed, received)
    A rows of a padded grouped-GEMM buffer              G tokens an expert picks from a sequence (expert choice)
    P ranks of an ep group          X experts one destination holds (a rank's, or a machine's)
    M machines (routing nodes)      U (token, machine) pairs         I chunks of a pipelined exchange
"""
from moeyard.errors import ConfigError
from moeyard.models.build import build_model
from moeyard.models.config import ModelConfig, MoEConfig
from moeyard.models.moe.experts import GroupedExperts
from moeyard.models.moe.layer import MoE, MoEStats, TokenExchange
from moeyard.models.transformer import (
    ModelOutput,
    Transformer,
    copied_parameter_ids,
    expert_parameter_ids,
    no_decay_parameter_ids,
)

__all__ = [
    "ConfigError", "GroupedExperts", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEStats", "no_decay_parameter_ids",
    "TokenExchange", "Transformer", "build_model", "copied_parameter_ids", "expert_parameter_ids",
]
