"""A measured profile of this machine (profiler.py measures it) and the unit costs it gives the cost model."""
from __future__ import annotations

from dataclasses import dataclass

from moeyard.trainer.scheduler.cost_model import Phase, Workload

Fit = tuple[float, float]
"""(fixed seconds, seconds per unit): a straight line through two measurements."""


@dataclass(frozen=True)
class Profile:
    key: str
    dense_fwd_s: float
    dense_bwd_s: float
    experts_fwd: Fit
    experts_bwd: Fit
    all_to_all: Fit
    all_reduce_dp: Fit
    all_reduce_edp: Fit
    reduce_scatter_dp: Fit
    reduce_scatter_edp: Fit
    all_gather_dp: Fit
    all_gather_edp: Fit
    optimizer_s: float
    overlap_slowdown: float
    chunk_overhead_s: float = 0.0
    """Measured cost of each pipeline chunk beyond the first, per pass, that the parts above do not explain."""
    all_to_all_node: Fit = (0.0, 0.0)
    all_to_all_cross: Fit = (0.0, 0.0)
    """Where the ep group spans machines: the all-to-all inside one (the node group) and across them (the
    cross group), the two stages of hierarchical dispatch; (0, 0) where it does not."""


def line(x1: float, t1: float, x2: float, t2: float) -> Fit:
    slope = max(0.0, (t2 - t1) / (x2 - x1))
    return max(0.0, t1 - slope * x1), slope


def at(fit: Fit, x: float) -> float:
    return fit[0] + fit[1] * x


def profile_from_dict(data: dict) -> Profile:
    """The inverse of dataclasses.asdict (JSON turns the fits' tuples into lists)."""
    return Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class MeasuredCosts:
    """Unit costs from a Profile; dense time is spread over blocks in proportion to their FLOPs."""

    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.overlap_slowdown = profile.overlap_slowdown
        self.chunk_overhead_s = profile.chunk_overhead_s

    def dense(self, w: Workload, layer: int, phase: Phase) -> float:
        total = w.model_flops_fwd or sum(w.dense_flops) + w.head_flops  # what the profile's dense time covered
        share = w.layer_flops(layer) / total if total else 0.0
        if layer < 0:  # embedding: no FLOPs, but give it a sliver so ordering is kept
            share = 0.0
        return (self.p.dense_fwd_s if phase == "fwd" else self.p.dense_bwd_s) * share

    def experts(self, w: Workload, rows: float, phase: Phase, chunks: int = 1) -> float:
        """The fit at `rows`: each chunk pays its intercept, which under train.fp8 includes casting the
        weights that the chunks share (an overestimate of chunking's cost there)."""
        return at(self.p.experts_fwd if phase == "fwd" else self.p.experts_bwd, rows)

    def fp8_dispatch_casts(self, w: Workload, rows: float) -> tuple[float, float]:
        """Not profiled: none (an underestimate; the all-to-all fit gets the packed bytes)."""
        return 0.0, 0.0

    def selective_recompute(self, w: Workload, layer: int) -> float:
        """Attention's core's share of the block's FLOPs, of its measured forward (the profile does not time
        the memory-bound kernels apart: they are left out)."""
        flops = w.layer_flops(layer)
        return self.dense(w, layer, "fwd") * w.attention_flops_of(layer) / flops if flops else 0.0

    def all_to_all(self, w: Workload, nbytes: float) -> float:
        # The fit is for the bytes one rank sends in total, (ep-1)/ep of which leave the rank.
        return at(self.p.all_to_all, nbytes * w.ep / max(1, w.ep - 1)) if w.ep > 1 else 0.0

    def staged_all_to_all(self, w: Workload, nbytes: float, stage: str) -> float:
        """The stage's own group's fit (measured where the ep group spans machines), for the bytes leaving
        this rank; the ep group's fit for a profile without one."""
        if nbytes <= 0:
            return 0.0
        fit = self.p.all_to_all_cross if stage == "cross" else self.p.all_to_all_node
        if fit == (0.0, 0.0):
            return self.all_to_all(w, nbytes)
        size = w.ep_nodes if stage == "cross" else min(w.ranks_per_node, w.ep)
        return at(fit, nbytes * size / max(1, size - 1))

    def grad_reduce(self, w: Workload, nbytes: float, expert: bool, mode: str) -> float:
        group = "edp" if expert else "dp"
        fit = getattr(self.p, f"{'all_reduce' if mode == 'all_reduce' else 'reduce_scatter'}_{group}")
        return at(fit, nbytes)

    def all_gather(self, w: Workload, nbytes: float, expert: bool) -> float:
        return at(self.p.all_gather_edp if expert else self.p.all_gather_dp, nbytes)

    def send(self, w: Workload, nbytes: float, across_machines: bool) -> float:
        """A pair exchanging `nbytes`: the all-to-all fit, which is for what one rank sends in all."""
        return at(self.p.all_to_all, nbytes)

    def optimizer(self, w: Workload, mode: str) -> float:
        if mode == "all_reduce":
            return self.p.optimizer_s
        dense = sum(p.numel for p in w.params if not p.expert) * 4
        expert = sum(p.numel for p in w.params if p.expert) * 4
        edp = max(1, w.dp // w.ep)
        sharded = self.p.optimizer_s * (dense / w.dp + expert / edp) / max(1, dense + expert)
        if mode == "fsdp":  # the shards only; parameters are gathered where they are used
            return sharded
        return sharded + self.all_gather(w, dense, False) + self.all_gather(w, expert, True)
