"""Freeze parameters by name: `train.trainable` and `train.frozen`, shell-style patterns over names.

Freezing sets requires_grad=False before expert parallelism, the optimizer and
the gradient buckets are built. Each of those keeps only parameters that need a
gradient, so a frozen parameter gets no gradient, no optimizer state and no
gradient communication, in the dense group and in the expert groups alike.

Names are the single-device model's (`layers.3.moe.experts.w_gate_EDF`), the
same at any ep: expert shards keep their weight's name.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Optional

from torch import nn

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig
from moeyard.models.peft.adapters import ADAPTER_PATTERN, is_adapter_parameter
from moeyard.trainer.scheduler.block_shapes import parameter_shapes


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def frozen_names(names: list[str], trainable: Optional[list[str]], frozen: list[str]) -> set[str]:
    """Names that do not train: outside `trainable` (when given) or inside `frozen`.

    A pattern that matches nothing is an error (a typo would otherwise train or freeze the wrong thing),
    and so is leaving nothing to train."""
    for key, patterns in (("train.trainable", trainable or []), ("train.frozen", frozen)):
        for p in patterns:
            if not any(fnmatchcase(n, p) for n in names):
                examples = ", ".join(names[i] for i in range(0, len(names), max(1, len(names) // 6)))
                raise ConfigError(f"{key} pattern {p!r} matches no parameter; names look like {examples} "
                                  f"(shell-style patterns: * matches any text, dots included)")
    if trainable is None and any(is_adapter_parameter(n) for n in names):
        trainable = [ADAPTER_PATTERN]  # a model with adapters tunes the adapters (and their routers) only
    trains = [n for n in names if (trainable is None or _matches(n, trainable)) and not _matches(n, frozen)]
    if not trains:
        raise ConfigError("train.trainable and train.frozen leave no parameter to train")
    return set(names) - set(trains)


def frozen_set(model_cfg: ModelConfig, trainable: Optional[list[str]], frozen: list[str]) -> frozenset[str]:
    """The frozen names of this model config, from a model built on the meta device (no memory); also the
    patterns' check before any worker starts."""
    if trainable is None and not frozen and model_cfg.peft.method == "none":
        return frozenset()
    names = [name for name, _, _ in parameter_shapes(model_cfg)]
    return frozenset(frozen_names(names, trainable, frozen))


def freeze(model: nn.Module, trainable: Optional[list[str]], frozen: list[str]) -> tuple[int, int]:
    """Apply the patterns to the full model (before expert parallelism); returns (trainable, total) counts."""
    params = dict(model.named_parameters())
    if trainable is not None or frozen or any(is_adapter_parameter(n) for n in params):
        for name in frozen_names(list(params), trainable, frozen):
            params[name].requires_grad_(False)
    return sum(p.numel() for p in params.values() if p.requires_grad), sum(p.numel() for p in params.values())

