"""The public Python API: load a trained model, or the config a run would use. These names are stable.

    model = moeyard.load_model("runs/tiny")          # a run folder, a checkpoint, or a converted one
    logits_BTV = model(tokens_BT)                    # [B, T, vocab], in this process, no process group
    cfg = moeyard.load_config("configs/tiny.yaml", overrides=["optim.lr=1e-3"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from moeyard.models import ModelConfig, Transformer, build_model
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.store import resolve_init, verify
from moeyard.trainer.checkpoint.weights import CheckpointTensors
from moeyard.trainer.config.resolve import resolve_run
from moeyard.trainer.config.sections import Config, build_config
from moeyard.trainer.scheduler.memory_fit import MemoryBudget


class LoadedModel(nn.Module):
    """A model ready for inference: calling it returns logits. `transformer` is moeyard's own model, whose
    forward also returns the router losses and per-layer expert loads."""

    def __init__(self, transformer: Transformer) -> None:
        super().__init__()
        self.transformer = transformer

    @property
    def config(self) -> ModelConfig:
        return self.transformer.cfg

    def forward(self, tokens_BT: Tensor, segment_BT: Optional[Tensor] = None) -> Tensor:
        """Logits [B, T, vocab] for token ids [B, T]; `segment_BT` keeps packed sequences apart."""
        return self.transformer(tokens_BT, segment_BT).logits_BTV


def load_model(path: str | Path) -> LoadedModel:
    """The model of a run folder (its newest checkpoint), of a training checkpoint, or of a checkpoint that
    `moeyard convert` or `moeyard prune` wrote, on the CPU in eval mode, in this process.

    Every file is checked against the manifest's sizes and sha256 first (CheckpointError names what is
    wrong); an adapter checkpoint loads its base first. Experts are read whole, whatever ep wrote them.
    The caller's random number generators are left as they were.
    """
    checkpoint = resolve_init(Path(path))
    manifest = verify(checkpoint)
    model_cfg = build_config(manifest["config"]).model
    CheckpointTensors(checkpoint).check_shapes(model_cfg)
    with torch.random.fork_rng(devices=[]):  # building the model draws its (overwritten) initial weights
        transformer = build_model(model_cfg)
    load_full_model(checkpoint, transformer)
    return LoadedModel(transformer).eval()


def load_config(path: Optional[str | Path], overrides: Sequence[str] = (), machines: Optional[Sequence[str]] = None,
                memory: Optional[Callable[[Config], Optional[MemoryBudget]]] = None) -> Config:
    """The config `moeyard train PATH --set OVERRIDE ...` runs with (None: the defaults): validated, with
    the model section of `checkpoint.init` when it names one and the corpus location. Given `machines`
    (the machine each rank runs on, in rank order) also the world's checks and the node layout; given
    `memory` (each rank's budget for a config) also the memory fit. Raises ConfigError naming the key and
    the fix."""
    return resolve_run(path, overrides, machines, memory)
