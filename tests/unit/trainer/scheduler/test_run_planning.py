"""schedule.mode=auto chooses fsdp over the configured replicated sync only where it is predicted faster."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config.sections import read_config
from moeyard.trainer.scheduler.run_planning import auto_plan, workload


@dataclass
class Costs:
    """Round numbers; `all_reduce_s` is what each gradient all-reduce costs."""

    all_reduce_s: float
    overlap_slowdown: float = 1.0
    chunk_overhead_s: float = 0.0

    def dense(self, w, layer, phase):
        return 1e-3

    def experts(self, w, rows, phase, chunks=1):
        return rows * 1e-7

    def selective_recompute(self, w, layer):
        return 2e-5

    def all_to_all(self, w, nbytes):
        return 1e-4

    def grad_reduce(self, w, nbytes, expert, mode):
        return self.all_reduce_s if mode == "all_reduce" else 1e-5

    def all_gather(self, w, nbytes, expert):
        return 1e-5

    def optimizer(self, w, mode):
        return 1e-4


def test_auto_takes_fsdp_only_where_it_is_faster() -> None:
    cfg = read_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2"])
    w = workload(cfg, 4, 4)
    slow_all_reduce, _ = auto_plan(cfg, w, Costs(all_reduce_s=1.0))
    assert slow_all_reduce.grad_sync == "fsdp"
    cheap_all_reduce, _ = auto_plan(cfg, w, Costs(all_reduce_s=1e-6))
    assert cheap_all_reduce.grad_sync == "all_reduce"
    configured = read_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2", "parallel.fsdp=true"])
    assert auto_plan(configured, w, Costs(all_reduce_s=1e-6))[0].grad_sync == "fsdp"  # asked for: kept


def test_auto_with_known_memory_takes_the_fastest_layout_that_fits() -> None:
    """Gathering once per step saves the gathers of every micro-step but holds the unsharded model: taken
    where it fits, not where it does not; recompute below the configured mode where memory allows."""
    from moeyard.trainer.scheduler.run_planning import layout_choices

    cfg = read_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2", "parallel.fsdp=true",
                                                  "train.micro_batch_size=1", "train.recompute=full"])
    w = workload(cfg, 4, 4)
    assert w.micro_steps > 1

    @dataclass
    class SlowGathers(Costs):
        def all_gather(self, w, nbytes, expert):
            return 1e-2

        def optimizer(self, w, mode):  # ZeRO gathers the parameters back after its step
            return 1.0 if mode == "reduce_scatter" else 1e-4

    costs = SlowGathers(all_reduce_s=1.0)  # replicated and ZeRO lose on their all-reduce and gather
    choices = {(c.name, c.recompute): c for c in layout_choices(cfg, w, costs, capacity_gb=100.0)}
    once = choices["fsdp gathered once", "none"]
    assert once.memory_gb > choices["fsdp per micro-step", "none"].memory_gb
    roomy, _ = auto_plan(cfg, w, costs, capacity_gb=100.0)
    assert (roomy.grad_sync, roomy.gather_once, roomy.recompute) == ("fsdp", True, "none")
    # Room for the per-micro-step layout with full recompute only: the configured one stays.
    tight = choices["fsdp per micro-step", "full"].memory_gb * 1.001
    assert all(c.memory_gb > tight for key, c in choices.items() if key != ("fsdp per micro-step", "full"))
    kept, _ = auto_plan(cfg, w, costs, capacity_gb=tight)
    assert (kept.grad_sync, kept.gather_once, kept.recompute) == ("fsdp", False, "")


def test_bfloat16_reduction_weighs_resident_weights_but_not_reducing_once() -> None:
    """Reducing once accumulates unsharded gradients in reduce_dtype: not weighed with bfloat16 reduction;
    resident weights accumulate into float32 shards and are."""
    from moeyard.trainer.scheduler.run_planning import layout_choices

    cfg = read_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2", "parallel.fsdp=true",
                                                  "train.micro_batch_size=1", "parallel.reduce_dtype=bfloat16"])
    names = {c.name for c in layout_choices(cfg, workload(cfg, 4, 4), Costs(all_reduce_s=1e-3), capacity_gb=100.0)}
    assert "fsdp resident weights" in names and "fsdp gathered once" not in names
    with pytest.raises(ConfigError, match="fsdp_reduce_once=false needs parallel.fsdp_gather_once=true"):
        read_config(configs.path("tiny.yaml"), ["parallel.fsdp=true", "parallel.fsdp_reduce_once=false"])
