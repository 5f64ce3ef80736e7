"""The launcher's memory check: what auto chooses reaches every worker, and on several nodes it is named
instead of chosen (each node sees its own free memory, and nodes that chose differently would hang)."""
from __future__ import annotations

import pytest
import torch

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.launch.commands import train as train_command
from moeyard.parallel.scheduler.memory_model import GB, predict_memory
from moeyard.trainer.config import load_config
from moeyard.trainer.memory_plan import memory_layout

MODEL = ["model.vocab_size=4096", "model.dim=256", "model.n_layers=4", "model.moe.ffn_dim=512", "train.seq_len=256",
         "train.global_batch_tokens=16384", "parallel.ep=2", "schedule.mode=auto"]


def test_auto_overrides_on_one_node_and_names_them_on_several(monkeypatch) -> None:
    cfg = load_config(configs.path("tiny.yaml"), MODEL)
    full = load_config(configs.path("tiny.yaml"), MODEL + ["train.recompute=full"])
    capacity = predict_memory(full.model, memory_layout(full, 2, 4)).total / GB / 0.9 * 1.001
    monkeypatch.setattr(train_command, "_memory_per_rank", lambda cfg, nproc: (capacity, 0.0, "test",
                                                                                 torch.device("cpu")))
    assert "train.recompute=full" in train_command._fit_memory(cfg, 2, 2, nodes=1)
    with pytest.raises(ConfigError, match="on every node's command line .*--set train.recompute=full"):
        train_command._fit_memory(cfg, 2, 1, nodes=2)
    off = load_config(configs.path("tiny.yaml"), MODEL + ["schedule.memory_check=false"])
    assert train_command._fit_memory(off, 2, 2, nodes=1) == []
