"""The model a config describes: the base Transformer, then what converts it (model.peft's adapters).

The converters act on a built model from outside, as torchtitan's model converters do: the Transformer
knows nothing of adapters, and the base draws its initial values first, so the same seed gives the same
base weights with or without them.
"""
from __future__ import annotations

from moeyard.models.config import ModelConfig
from moeyard.models.peft.adapters import add_routed_adapters
from moeyard.models.transformer import Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    if cfg.peft.method != "none":
        add_routed_adapters(model, cfg.peft)
    return model
