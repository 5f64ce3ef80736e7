"""Search the plan with the least predicted step time.

Candidates: the reference (r=1, reduction after backward), and every
combination of a pipeline degree per MoE layer and a gradient bucket size. The
search first tries a uniform degree for all layers with each bucket size, then
improves layer by layer (coordinate descent) -- layers see different
neighbours on the communication stream, so their best degrees may differ.
"""
from __future__ import annotations

import dataclasses
import math

from moeyard.parallel.grads.buckets import bucket_sizes
from moeyard.parallel.plan import GradSync, Plan, ReduceOnce
from moeyard.trainer.scheduler.cost_model import Costs, Prediction, Workload, predict

CHUNK_CHOICES = (1, 2, 4, 8)
BUCKET_CAPS_MB = (0.25, 1.0, 4.0, 16.0, 64.0, math.inf)
MIN_GAIN = 0.02
"""A plan leaves the reference only for a predicted gain above this fraction: a smaller one is inside what the
cost model cannot promise (measured costs vary from repeat to repeat by a few percent; on this project's
2-core CPU host, benchmarks/moe_layer.py picked r=2 from a 2% predicted gain and ran 2.5% slower than r=1),
and running something other than the reference for it risks a slower step. The whole plan (chunks and
buckets) goes back to the reference."""


def worth_leaving(reference_s: float, candidate_s: float) -> bool:
    """Whether a predicted `candidate_s` beats `reference_s` by enough to run something other than the
    reference (see MIN_GAIN)."""
    return candidate_s < reference_s * (1 - MIN_GAIN)


def reference_plan(w: Workload, grad_sync: GradSync) -> Plan:
    """schedule: off -- the plain path every test compares against."""
    n_dense = sum(1 for p in w.params if not p.expert)
    n_expert = len(w.params) - n_dense
    return Plan(chunks=(1,) * len(w.moe_layers), dense_buckets=(n_dense,) if n_dense else (),
                expert_buckets=(n_expert,) if n_expert else (), grad_sync=grad_sync,
                overlap_grads=grad_sync != "all_reduce", source="off")


def manual_plan(w: Workload, chunks: int, bucket_mb: float, grad_sync: GradSync) -> Plan:
    """schedule: manual -- the same pipeline degree in every MoE layer, buckets closed at `bucket_mb`
    (with pipeline stages, the reference's reduction after the schedule: STAGED_REDUCTION)."""
    if w.pp > 1:
        return dataclasses.replace(reference_plan(w, grad_sync), chunks=(chunks,) * len(w.moe_layers),
                                   source="manual")
    return Plan(chunks=(chunks,) * len(w.moe_layers), dense_buckets=_buckets(w, False, bucket_mb),
                expert_buckets=_buckets(w, True, bucket_mb), grad_sync=grad_sync, overlap_grads=True,
                source="manual")


STAGED_REDUCTION = """With pipeline stages (w.pp > 1) a rank holds part of the model, and replicated gradients are
reduced after the schedule's last backward, one bucket per group (PlainSync; the cost model predicts that): a
plan's bucket sizes would cut the whole model's parameters."""


def _buckets(w: Workload, expert: bool, cap_mb: float) -> tuple[int, ...]:
    return bucket_sizes([p.numel * w.grad_bytes for p in w.params if p.expert == expert], cap_mb * 2**20)


def _with_layer(plan: Plan, i: int, chunks: int, dispatch: str, n: int) -> Plan:
    """`plan` with MoE layer i at `chunks` and `dispatch`."""
    per_layer = [plan.dispatch_of(j) for j in range(n)]
    per_layer[i] = dispatch
    return dataclasses.replace(plan, chunks=plan.chunks[:i] + (chunks,) + plan.chunks[i + 1:],
                               dispatch=tuple(per_layer) if "hierarchical" in per_layer else ())


def with_prediction(plan: Plan, prediction: Prediction) -> Plan:
    return dataclasses.replace(plan, predicted=prediction.as_dict())


def search(w: Workload, costs: Costs, grad_sync: GradSync = "all_reduce",
           chunk_choices: tuple[int, ...] = CHUNK_CHOICES,
           bucket_caps_mb: tuple[float, ...] = BUCKET_CAPS_MB,
           dispatch_choices: tuple[str, ...] = ("flat",), gather_once: bool = False,
           reduce_once: ReduceOnce = True) -> tuple[Plan, Prediction]:
    """The plan with the least predicted step time (ties go to the simpler plan: flat dispatch before
    hierarchical, fewer chunks before more). `dispatch_choices`: what each MoE layer may use;
    `gather_once`, `reduce_once`: how fsdp gathers and reduces (Plan.gather_once, Plan.reduce_once)."""
    n = len(w.moe_layers)
    if w.pp > 1:  # STAGED_REDUCTION: buckets do not apply
        bucket_caps_mb = (math.inf,)
    reference = dataclasses.replace(reference_plan(w, grad_sync), gather_once=gather_once, reduce_once=reduce_once)
    if dispatch_choices == ("hierarchical",):
        reference = dataclasses.replace(reference, dispatch=("hierarchical",) * n)
    best_plan, best = reference, predict(w, reference, costs)
    # Degrees beyond the rows per expert only add latency.
    choices = [r for r in chunk_choices if r == 1 or r <= max(1, w.routed_rows // max(1, w.num_experts))]
    for cap in bucket_caps_mb:
        for d in dispatch_choices:
            for r in choices:
                plan = Plan(chunks=(r,) * n, dense_buckets=_buckets(w, False, cap),
                            expert_buckets=_buckets(w, True, cap), grad_sync=grad_sync,
                            dispatch=(d,) * n if d != "flat" else (), gather_once=gather_once,
                            reduce_once=reduce_once, overlap_grads=w.pp == 1 or grad_sync != "all_reduce",
                            source="planner")
                pred = predict(w, plan, costs)
                if pred.step < best.step * (1 - 1e-9):
                    best_plan, best = plan, pred
    if best_plan.source == "planner":
        for i in range(n):
            for d in dispatch_choices:
                for r in choices:
                    plan = _with_layer(best_plan, i, r, d, n)
                    pred = predict(w, plan, costs)
                    if pred.step < best.step * (1 - 1e-9):
                        best_plan, best = plan, pred
    if best_plan.source == "planner" and not worth_leaving(predict(w, reference, costs).step, best.step):
        best_plan, best = reference, predict(w, reference, costs)
    r1 = dataclasses.replace(best_plan, chunks=(1,) * n)
    plan = dataclasses.replace(best_plan, source="planner",
                               predicted={**best.as_dict(), "off_step_s": predict(w, reference, costs).step,
                                          "r1_step_s": predict(w, r1, costs).step})
    return plan, best
