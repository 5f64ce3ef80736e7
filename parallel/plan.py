"""The plan: how every MoE layer is pipelined and how gradients are bucketed.

A frozen dataclass, made by the planner (or from manual settings), printed by
`moeyard plan`, logged with the run and stored in checkpoints as JSON.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Sequence

GradSync = Literal["all_reduce", "reduce_scatter", "fsdp"]
ReduceOnce = bool | tuple[bool, ...]
"""Whether fsdp gathered once reduces once per step (else every micro-step): for every pipeline rank, or one
value per pipeline rank (parallel.fsdp_reduce_once)."""


def reduce_once_on(reduce_once: bool | Sequence[bool], pp_rank: int) -> bool:
    """A ReduceOnce (or the config's list) on pipeline rank `pp_rank`."""
    return reduce_once if isinstance(reduce_once, bool) else bool(reduce_once[pp_rank])


def holds_reduction(fsdp: bool, gather_once: bool, reduce_once: bool | Sequence[bool], pp_rank: int) -> bool:
    """Whether pipeline rank `pp_rank`'s gradient sync can hold its reduction until a zero-bubble schedule's
    weight steps have run (parallel/grads/sync.py GradSync.holds_reduction): replicated stages reduce after the
    whole backward; fsdp only gathered once, on a rank that reduces once a step."""
    return not fsdp or (gather_once and reduce_once_on(reduce_once, pp_rank))


@dataclass(frozen=True)
class Plan:
    chunks: tuple[int, ...]
    """Pipeline degree r of each MoE layer, in block order; 1 is the plain exchange."""
    dense_buckets: tuple[int, ...]
    """Dense parameters per gradient bucket, in backward order (reverse registration order)."""
    expert_buckets: tuple[int, ...]
    """Expert parameters per gradient bucket, in backward order."""
    grad_sync: GradSync = "all_reduce"
    """reduce_scatter shards the optimizer state (ZeRO-1/2) over dp for dense and edp for experts; fsdp
    shards parameters, gradients and optimizer state with torch's FSDP2, one unit per block (buckets unused)."""
    dispatch: tuple[str, ...] = ()
    """Per MoE layer: flat or hierarchical (where the ep group spans machines); empty: flat everywhere."""
    gather_once: bool = False
    """fsdp: gather each unit's parameters once per step and reduce its gradients once (unsharded weights
    and gradients kept through the micro-steps), instead of in every micro-step."""
    reduce_once: ReduceOnce = True
    """With gather_once: False reduce-scatters every micro-step's gradients (only the weights stay gathered:
    resident weights, sharded float32 gradients); one value per pipeline rank where they differ."""
    recompute: str = ""
    """train.recompute as the planner chose it (schedule.mode=auto may keep more than the config names
    where memory allows); empty: as configured."""
    overlap_grads: bool = True
    """Launch bucket reductions from backward hooks; False reduces after backward (the reference)."""
    predicted: dict[str, float] = field(default_factory=dict)
    """Predicted seconds per stage and per step, from the cost model (empty when not planned)."""
    source: str = "off"
    """off, manual, or planner."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def reduce_once_on(self, pp_rank: int) -> bool:
        return reduce_once_on(self.reduce_once, pp_rank)

    def holds_reduction_on(self, pp_rank: int) -> bool:
        return holds_reduction(self.grad_sync == "fsdp", self.gather_once, self.reduce_once, pp_rank)

    def dispatch_of(self, moe_index: int) -> str:
        return self.dispatch[moe_index] if self.dispatch else "flat"

    def summary(self) -> str:
        hier = sum(d == "hierarchical" for d in self.dispatch)
        chunks = f"chunks per MoE layer {list(self.chunks)}" + (
            f"; hierarchical dispatch in {hier} of {len(self.dispatch)} MoE layers" if hier else "")
        if self.recompute:
            chunks += f"; train.recompute={self.recompute} (the planner's choice)"
        if self.grad_sync == "fsdp":
            when = "once per step" if self.gather_once else "in every micro-step"
            if self.gather_once and isinstance(self.reduce_once, tuple):
                once = [r for r, o in enumerate(self.reduce_once) if o]
                when += (f", gradients reduced once on pipeline rank(s) {', '.join(map(str, once))} and in every "
                         f"micro-step on the others" if once else ", gradients reduced in every micro-step")
            elif self.gather_once and not self.reduce_once:
                when += ", gradients reduced in every micro-step"
            return f"{chunks}; fsdp, one unit per block (experts over edp), gathered {when}"
        buckets = f"{len(self.dense_buckets)} dense + {len(self.expert_buckets)} expert buckets"
        overlap = "overlapped with backward" if self.overlap_grads else "after backward"
        return f"{chunks}; {buckets}, {self.grad_sync} {overlap}"
