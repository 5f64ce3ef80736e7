"""A plan is never slower than `off`, measured: the run times the planned pipeline against the plain one.

The cost model can be wrong for a machine (on 2 cores gloo's threads take CPU from the GEMMs, and a
plan that hides the exchange on paper loses 2-12% there). So, with schedule.mode=auto and a plan that
pipelines some MoE layer (r > 1), the first steps of the run are the experiment: after 2 warm-up
steps, schedule.check_steps steps run with the plan and as many with every layer at r=1 (the reference
exchange; the same arithmetic up to float rounding), each timed on the slowest rank. When the plan is
slower than r=1 by more than 3% (timing noise on a loaded machine), the run keeps r=1
(and says so); otherwise it goes back to the plan. Either way every rank decides alike, from the same
all-reduced times. What the trial measured is returned so that the profile can learn from it.

Only the pipeline degree is tried at run time; the gradient buckets stay as planned (changing them
would rebuild the gradient sync and its optimizer state mid-run).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from moeyard.models import Transformer
from moeyard.parallel.parallelize import set_chunks


@dataclass(frozen=True)
class TrialResult:
    plan_s: float
    """Median step time with the plan's chunks (slowest rank)."""
    reference_s: float
    """Median step time with every MoE layer at r=1."""
    switched: bool
    """The run continues at r=1."""

    def message(self, chunks: tuple[int, ...]) -> str:
        outcome = "switched back to r=1 for the rest of the run" if self.switched else "keeping the plan"
        return (f"plan check: chunks {list(chunks)} ran {self.plan_s * 1e3:.1f} ms per step, r=1 "
                f"{self.reference_s * 1e3:.1f} ms ({self.plan_s / self.reference_s:.3f}x): {outcome}")


@dataclass
class PlanCheck:
    """Feed it every step's time; it switches the model's exchanges during the trial and at its end."""

    model: Transformer
    chunks: tuple[int, ...]
    warmup: int = 2
    steps: int = 3
    noise: float = 0.03
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _times: list[float] = field(default_factory=list)
    result: Optional[TrialResult] = None

    @classmethod
    def for_run(cls, model: Transformer, chunks: tuple[int, ...], source: str, steps: int,
                device: torch.device) -> Optional["PlanCheck"]:
        """A check when the planner pipelined some layer and schedule.check_steps asks for one, else None."""
        if source != "planner" or steps <= 0 or all(r == 1 for r in chunks):
            return None
        return cls(model, chunks, steps=steps, device=device)

    def observe(self, step_time_s: float) -> Optional[TrialResult]:
        """Call after each step with its time; returns the result once, at the step that decides."""
        if self.result is not None:
            return None
        self._times.append(step_time_s)
        done = len(self._times) - self.warmup
        if done == self.steps:  # the plan's trial steps are over: the reference's begin
            set_chunks(self.model, (1,) * len(self.chunks))
        if done < 2 * self.steps:
            return None
        plan = self._times[self.warmup:self.warmup + self.steps]
        reference = self._times[self.warmup + self.steps:]
        times = torch.tensor([statistics.median(plan), statistics.median(reference)], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's, so every rank decides alike
        plan_s, reference_s = times.tolist()
        switched = plan_s > reference_s * (1 + self.noise)
        if not switched:
            set_chunks(self.model, self.chunks)
        self.result = TrialResult(plan_s, reference_s, switched)
        return self.result
