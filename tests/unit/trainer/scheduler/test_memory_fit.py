"""The check before any worker starts: a run that does not fit is refused, or (auto) made to fit."""
from __future__ import annotations

import pytest
import torch

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config.sections import read_config
from moeyard.trainer.scheduler.memory_fit import MemoryBudget, fit_memory, memory_layout
from moeyard.trainer.scheduler.memory_model import GB, predict_memory

MODEL = ["model.vocab_size=4096", "model.dim=256", "model.n_layers=4", "model.moe.num_experts=8",
         "model.moe.ffn_dim=512", "train.seq_len=256", "train.global_batch_tokens=16384", "parallel.ep=2"]


def _budget(capacity_gb: float) -> MemoryBudget:
    return MemoryBudget(capacity_gb, 0.0, "test", torch.device("cpu"))


def _peak_gb(cfg, world: int = 2) -> float:
    return predict_memory(cfg.model, memory_layout(cfg, world, 4)).total / GB


def test_a_run_that_fits_starts_as_configured() -> None:
    cfg = read_config(configs.path("tiny.yaml"), MODEL)
    run, overrides, message = fit_memory(cfg, 2, _budget(2 * _peak_gb(cfg)))
    assert run is cfg and overrides == [] and message.startswith("memory per rank:") and "fits test" in message


def test_a_run_that_does_not_fit_is_refused_with_the_numbers_and_what_would() -> None:
    cfg = read_config(configs.path("tiny.yaml"), MODEL)
    with pytest.raises(ConfigError) as err:
        fit_memory(cfg, 2, _budget(_peak_gb(cfg) / 2))
    text = str(err.value)
    assert f"{_peak_gb(cfg):.2f} GB predicted peak" in text and "does not fit test" in text
    assert "parallel.fsdp=true" in text and "train.recompute=full" in text and "memory_check=false" in text


def test_auto_picks_the_first_layout_that_fits_and_every_worker_gets_it() -> None:
    cfg = read_config(configs.path("tiny.yaml"), MODEL + ["schedule.mode=auto"])
    full = read_config(configs.path("tiny.yaml"), MODEL + ["schedule.mode=auto", "train.recompute=full"])
    capacity = _peak_gb(full) / 0.9 * 1.001  # fits once blocks are recomputed, not before
    run, overrides, message = fit_memory(cfg, 2, _budget(capacity))
    assert "train.recompute=full" in overrides, overrides
    chosen = read_config(configs.path("tiny.yaml"), MODEL + ["schedule.mode=auto", *overrides])
    assert run == chosen  # the run it returns is the one its overrides name
    assert _peak_gb(chosen) <= 0.9 * capacity and "schedule.mode=auto chose" in message
    # Nothing fits at all: refused, saying auto tried.
    with pytest.raises(ConfigError, match="schedule.mode=auto found no"):
        fit_memory(cfg, 2, _budget(0.001))


def test_auto_with_pipeline_stages_tries_only_what_a_pipeline_runs() -> None:
    """pp 2 on 4 ranks (2 per stage, 32 sequences each): auto's alternatives keep at least 2 micro-batches a
    step and never take ZeRO (refused with stages); what it chooses is a run config validation accepts."""
    from moeyard.trainer.config.sections import validate_for_world
    from moeyard.trainer.scheduler.memory_fit import _alternatives

    cfg = read_config(configs.path("tiny.yaml"), MODEL + ["schedule.mode=auto", "parallel.pp=2"])
    tried = list(_alternatives(cfg, 4))
    assert tried and not any("schedule.grad_sync=reduce_scatter" in overrides for overrides, _ in tried)
    assert {run.train.micro_batch_size or 32 for _, run in tried} == {1, 2, 4, 8, 16}  # 32: one micro-batch
    fsdp = read_config(configs.path("tiny.yaml"), MODEL + ["schedule.mode=auto", "parallel.pp=2",
                                                           "parallel.fsdp=true", "train.micro_batch_size=4"])
    run, overrides, _ = fit_memory(cfg, 4, _budget(_peak_gb(fsdp, 4) / 0.9 * 1.001))
    assert overrides and run.parallel.pp == 2
    validate_for_world(run, 4)
