"""schedule.mode=auto chooses fsdp over the configured replicated sync only where it is predicted faster."""
from __future__ import annotations

from dataclasses import dataclass

from moeyard import configs
from moeyard.trainer.config import load_config
from moeyard.trainer.schedule import auto_plan, workload


@dataclass
class Costs:
    """Round numbers; `all_reduce_s` is what each gradient all-reduce costs."""

    all_reduce_s: float
    overlap_slowdown: float = 1.0
    chunk_overhead_s: float = 0.0

    def dense(self, w, layer, phase):
        return 1e-3

    def experts(self, w, rows, phase):
        return rows * 1e-7

    def all_to_all(self, w, nbytes):
        return 1e-4

    def grad_reduce(self, w, nbytes, expert, mode):
        return self.all_reduce_s if mode == "all_reduce" else 1e-5

    def all_gather(self, w, nbytes, expert):
        return 1e-5

    def optimizer(self, w, mode):
        return 1e-4


def test_auto_takes_fsdp_only_where_it_is_faster() -> None:
    cfg = load_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2"])
    w = workload(cfg, 4, 4)
    slow_all_reduce, _ = auto_plan(cfg, w, Costs(all_reduce_s=1.0))
    assert slow_all_reduce.grad_sync == "fsdp"
    cheap_all_reduce, _ = auto_plan(cfg, w, Costs(all_reduce_s=1e-6))
    assert cheap_all_reduce.grad_sync == "all_reduce"
    configured = load_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=2", "parallel.fsdp=true"])
    assert auto_plan(configured, w, Costs(all_reduce_s=1e-6))[0].grad_sync == "fsdp"  # asked for: kept
