"""The shapes-only build the launcher plans with: the same parameters as the model itself."""
from __future__ import annotations

import pytest
import torch

from moeyard import configs
from moeyard.models import build_model, expert_parameter_ids
from moeyard.models.meta_init import shapes_only
from moeyard.trainer.config.sections import read_config


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-mla.yaml", "tiny-gpt-oss.yaml", "sft-tiny-lora-moe.yaml"])
def test_shapes_only_has_the_models_parameters_and_buffers(name: str) -> None:
    cfg = read_config(configs.path(name), ()).model
    with torch.device("meta"):
        built = build_model(cfg)
    planned = shapes_only(cfg)
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in planned.named_parameters()}
    assert shapes == {n: (tuple(p.shape), p.dtype) for n, p in built.named_parameters()}
    real = build_model(cfg)  # on the CPU: the RoPE tables computed, not placeholders
    assert {n: (b.shape, b.dtype) for n, b in planned.named_buffers()} == \
        {n: (b.shape, b.dtype) for n, b in real.named_buffers()}
    assert len(expert_parameter_ids(planned)) == len(expert_parameter_ids(built)) > 0
