"""The memory check in resolving a run: what auto chooses is part of the resolved config every worker reads,
and on several machines it is named instead of chosen (each machine sees its own free memory, and machines
that chose differently would hang)."""
from __future__ import annotations

import pytest
import torch

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config.resolve import machines_of, resolve_run
from moeyard.trainer.config.sections import read_config
from moeyard.trainer.scheduler.memory_fit import MemoryBudget, memory_layout
from moeyard.trainer.scheduler.memory_model import GB, predict_memory

MODEL = ["model.vocab_size=4096", "model.dim=256", "model.n_layers=4", "model.moe.ffn_dim=512", "train.seq_len=256",
         "train.global_batch_tokens=16384", "parallel.ep=2", "schedule.mode=auto"]


def test_auto_chooses_on_one_machine_and_names_it_on_several() -> None:
    full = read_config(configs.path("tiny.yaml"), MODEL + ["train.recompute=full"])
    capacity = predict_memory(full.model, memory_layout(full, 2, 4)).total / GB / 0.9 * 1.001
    budget = lambda cfg: MemoryBudget(capacity, 0.0, "test", torch.device("cpu"))  # noqa: E731
    said: list[str] = []
    cfg = resolve_run(configs.path("tiny.yaml"), MODEL, machines_of(2, 2), memory=budget, say=said.append)
    assert cfg.train.recompute == "full" and "schedule.mode=auto chose train.recompute=full" in said[-1]
    with pytest.raises(ConfigError, match="on every node's command line .*--set train.recompute=full"):
        resolve_run(configs.path("tiny.yaml"), MODEL, machines_of(2, 1), memory=budget)
    off = resolve_run(configs.path("tiny.yaml"), MODEL + ["schedule.memory_check=false"], machines_of(2, 2),
                      memory=budget)
    assert off.train.recompute == read_config(configs.path("tiny.yaml"), MODEL).train.recompute != "full"
