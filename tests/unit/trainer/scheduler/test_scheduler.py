"""Simulator, cost model and planner on hand-checkable cases."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from moeyard.models import ModelConfig, MoEConfig
from moeyard.parallel.plan import Plan
from moeyard.trainer.scheduler.cost_model import build_step, predict, workload_for
from moeyard.trainer.scheduler.planner import reference_plan, search
from moeyard.trainer.scheduler.simulator import Schedule


@dataclass
class FakeCosts:
    """Round numbers: experts 1 ms per 1000 rows, all-to-all 0.1 ms + 1 ms per MB."""

    overlap_slowdown: float = 1.0
    a2a_ms_per_mb: float = 1.0
    chunk_overhead_s: float = 0.0

    def dense(self, w, layer, phase):
        return 1e-4 * (2 if phase == "bwd" else 1)

    def experts(self, w, rows, phase, chunks=1):
        return rows * 1e-6 * (2 if phase == "bwd" else 1)

    def selective_recompute(self, w, layer):
        return 2e-5

    def all_to_all(self, w, nbytes):
        return 1e-4 + nbytes / 1e6 * self.a2a_ms_per_mb * 1e-3

    def grad_reduce(self, w, nbytes, expert, mode):
        return 1e-4 + nbytes * 1e-10

    def all_gather(self, w, nbytes, expert):
        return 1e-5 + nbytes * 1e-10

    def optimizer(self, w, mode):
        return 1e-4

    def send(self, w, nbytes, across_machines):
        return 1e-4 if across_machines else 1e-5


def small_workload(ep: int = 4):
    cfg = ModelConfig(vocab_size=256, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=512,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=512))
    return workload_for(cfg, tokens=8192, seq_len=512, ep=ep, dp=ep, micro_steps=1)


def off_buckets(w, expert: bool) -> tuple[int, ...]:
    return (sum(1 for p in w.params if p.expert == expert),)


def test_serial_chain_exposes_all_communication() -> None:
    s = Schedule()
    a = s.add("compute", "compute", 1.0)
    s.add("send", "comm", 2.0, [a])
    t = s.run()
    assert t.makespan == pytest.approx(3.0) and t.exposed_comm == pytest.approx(2.0)


def test_independent_streams_overlap_and_contention_slows_both() -> None:
    s = Schedule()
    s.add("compute", "compute", 3.0)
    s.add("send", "comm", 2.0)
    assert s.run().makespan == pytest.approx(3.0)
    # Both at half speed while together: comm ends at 4 s, compute has 1 s left at full speed.
    assert s.run(overlap_slowdown=2.0).makespan == pytest.approx(5.0)


def test_stream_order_is_issue_order() -> None:
    s = Schedule()
    first = s.add("slow", "comm", 2.0)
    s.add("ready_early", "comm", 1.0)  # no dependencies, but issued after `slow`
    t = s.run()
    assert t.tasks[1].start == pytest.approx(2.0) and t.tasks[first].end == pytest.approx(2.0)


def test_impossible_dependencies_are_reported() -> None:
    s = Schedule()
    s.add("a", "compute", 1.0, [1])
    s.add("b", "comm", 1.0, [0])
    with pytest.raises(ValueError, match="deadlocks"):
        s.run()


def test_pipelining_hides_all_to_all_when_compute_dominates() -> None:
    w = small_workload()
    costs = FakeCosts(a2a_ms_per_mb=0.2)
    off = predict(w, reference_plan(w, "all_reduce"), costs)
    plan = Plan(chunks=(4,) * 4, dense_buckets=off_buckets(w, False), expert_buckets=off_buckets(w, True),
                overlap_grads=True, source="test")
    piped = predict(w, plan, costs)
    assert piped.step < off.step
    assert piped.hidden_fraction > 0.6 > off.hidden_fraction
    assert piped.stages["experts"] == pytest.approx(off.stages["experts"])


def test_bucket_reductions_start_during_backward() -> None:
    w = small_workload()
    n_dense = off_buckets(w, False)[0]
    plan = Plan(chunks=(1,) * 4, dense_buckets=(n_dense // 2, n_dense - n_dense // 2),
                expert_buckets=off_buckets(w, True), overlap_grads=True, source="test")
    t = build_step(w, plan, FakeCosts()).run()
    end_of_backward = next(task.end for task in t.tasks if task.name == "embed.bwd")
    first_bucket = next(task for task in t.tasks if task.name == "grad.dense0")
    assert first_bucket.start < end_of_backward


def test_planner_pipelines_when_it_pays_and_refuses_when_contention_eats_the_gain() -> None:
    w = small_workload()
    plan, pred = search(w, FakeCosts(a2a_ms_per_mb=0.5))
    assert max(plan.chunks) > 1 and plan.source == "planner"
    assert pred.step <= predict(w, reference_plan(w, "all_reduce"), FakeCosts(a2a_ms_per_mb=0.5)).step
    crowded = FakeCosts(a2a_ms_per_mb=0.5, overlap_slowdown=3.0)
    plan, _ = search(w, crowded)
    assert plan.chunks == (1,) * 4


def test_a_predicted_gain_inside_the_profilers_spread_keeps_the_reference_plan() -> None:
    """All-to-alls so cheap that pipelining them is predicted 1.3% faster (inside MIN_GAIN): the plain path
    runs, as off would; 4.5% faster: the planner departs."""
    w = small_workload()
    plan, pred = search(w, FakeCosts(a2a_ms_per_mb=0.01))
    reference = predict(w, reference_plan(w, "all_reduce"), FakeCosts(a2a_ms_per_mb=0.01)).step
    assert plan.chunks == (1,) * 4 and pred.step == reference
    plan, pred = search(w, FakeCosts(a2a_ms_per_mb=0.05))
    assert max(plan.chunks) > 1 and pred.step < 0.98 * predict(w, reference_plan(w, "all_reduce"),
                                                               FakeCosts(a2a_ms_per_mb=0.05)).step


def test_two_communicators_share_the_link() -> None:
    s = Schedule()
    s.add("all_to_all", "comm", 1.0)
    s.add("bucket", "grad", 1.0)
    t = s.run()
    assert t.makespan == pytest.approx(2.0)  # concurrent, at half bandwidth each
    assert t.tasks[1].start == 0.0  # a gradient bucket does not queue behind an all-to-all


def test_fsdp_gathers_each_block_twice_prefetched_and_reduces_it_in_every_micro_step() -> None:
    """FSDP units: every block gathered before its forward and its backward, the next block's gather
    running while this block computes; each unit's reduce-scatter after its backward, in every micro-step."""
    w = small_workload()
    plan = reference_plan(w, "fsdp")
    t = build_step(w, plan, FakeCosts()).run()
    tasks = {task.name: task for task in t.tasks}
    gathers = [n for n in tasks if n.startswith("fsdp.gather.")]
    assert sorted(gathers) == sorted(["fsdp.gather.L-1.fwd"] + [f"fsdp.gather.L{i}.{ph}" for i in range(4)
                                                               for ph in ("fwd", "bwd")])
    # L1's gather runs during L0's forward (prefetched), not after it.
    assert tasks["fsdp.gather.L1.fwd"].start < tasks["L0.dense.fwd"].end
    assert tasks["L1.dense.fwd"].start >= tasks["fsdp.gather.L1.fwd"].end
    assert {n for n in tasks if n.startswith("grad.")} == (
        {f"grad.fsdp.L{i}" for i in range(-1, 4)} | {f"grad.fsdp.L{i}.expert_shards" for i in range(4)})
    assert tasks["grad.fsdp.L3"].start < tasks["embed.bwd"].end  # reduce-scatters overlap the backward
    one = predict(w, plan, FakeCosts())
    two = predict(dataclasses.replace(w, micro_steps=2), plan, FakeCosts())
    assert two.stages["grad_reduce"] == pytest.approx(2 * one.stages["grad_reduce"])
    assert two.stages["param_gather"] == pytest.approx(2 * one.stages["param_gather"])


def test_gather_once_charges_one_gather_and_one_reduction_per_step() -> None:
    """4 micro-steps: per micro-step fsdp gathers every block twice (forward, backward) and reduces it in each;
    gathered once, the forward of the first gathers and the backward of the last reduces."""
    w = dataclasses.replace(small_workload(), micro_steps=4)
    every = reference_plan(w, "fsdp")
    once = dataclasses.replace(every, gather_once=True)
    per_micro, gathered_once = predict(w, every, FakeCosts()), predict(w, once, FakeCosts())
    # 8x for the blocks (two passes, four micro-steps); the root unit is gathered once a micro-step either way.
    assert 7 < per_micro.stages["param_gather"] / gathered_once.stages["param_gather"] < 8
    assert gathered_once.stages["grad_reduce"] * 4 == pytest.approx(per_micro.stages["grad_reduce"])
    assert gathered_once.step < per_micro.step
    half = dataclasses.replace(w, grad_bytes=2)  # parallel.reduce_dtype=bfloat16: half the bytes reduced
    assert predict(half, once, FakeCosts()).stages["grad_reduce"] < gathered_once.stages["grad_reduce"]
    resident = predict(w, dataclasses.replace(once, reduce_once=False), FakeCosts())  # reduced every micro-step
    assert resident.stages["param_gather"] == pytest.approx(gathered_once.stages["param_gather"])
    assert resident.stages["grad_reduce"] == pytest.approx(per_micro.stages["grad_reduce"])


def test_selective_recompute_charges_its_cheap_ops_and_no_gemm_or_all_to_all() -> None:
    """selective adds each block's selective_recompute to its backward and nothing else; full runs the whole
    forward again, its all-to-alls too."""
    w = small_workload()
    plan = reference_plan(w, "all_reduce")
    times = {mode: predict(dataclasses.replace(w, recompute=mode), plan, FakeCosts()) for mode in
             ("none", "selective", "full")}
    extra = FakeCosts().selective_recompute(w, 0) * w.n_layers
    assert times["selective"].step - times["none"].step == pytest.approx(extra)
    assert times["selective"].step < times["full"].step
    tasks = {t.name for t in build_step(dataclasses.replace(w, recompute="selective"), plan, FakeCosts()).run().tasks}
    assert not any("moe.recompute" in name for name in tasks)


def test_bfloat16_moments_move_20_bytes_a_parameter_in_the_optimizer_step_not_28() -> None:
    from moeyard.trainer.scheduler.hardware import HardwareCosts
    from moeyard.trainer.scheduler.run_planning import load_hardware

    costs = HardwareCosts(load_hardware("dgx-h100"))
    w = small_workload()
    for mode in ("all_reduce", "fsdp"):
        full = costs.optimizer(w, mode)
        assert costs.optimizer(dataclasses.replace(w, moment_bytes=2), mode) == pytest.approx(full * 20 / 28)


def test_pipeline_stages_cost_the_slowest_stage_plus_the_bubble() -> None:
    """pp stages: each runs its blocks' part of the step; the step is the slowest stage's plus pp - 1 of its
    micro-steps (the bubble) and two activation transfers per idle micro-step. More micro-batches shrink the
    bubble's share."""
    w = dataclasses.replace(small_workload(), micro_steps=8)
    plan = reference_plan(w, "all_reduce")
    whole = predict(w, plan, FakeCosts())
    staged = dataclasses.replace(w, pp=2, stages_across_machines=True)
    two = predict(staged, plan, FakeCosts())
    micro = (two.step - two.stages["pipeline_bubble"] - two.stages["optimizer"]) / 8
    assert two.stages["pipeline_bubble"] == pytest.approx(1 * (micro + 2 * 1e-4))
    # Half the blocks a stage: the experts' and all-to-alls' work halves, the step with it (plus the bubble).
    assert two.stages["experts"] == pytest.approx(whole.stages["experts"] / 2)
    assert two.stages["a2a"] == pytest.approx(whole.stages["a2a"] / 2)
    assert two.step < whole.step
    fewer = predict(dataclasses.replace(staged, micro_steps=2), plan, FakeCosts())
    assert fewer.stages["pipeline_bubble"] / fewer.step > two.stages["pipeline_bubble"] / two.step
    looped = predict(dataclasses.replace(staged, stages_per_rank=2), plan, FakeCosts())  # interleaved, 2 a rank
    assert looped.stages["pipeline_bubble"] == pytest.approx(micro / 2 + 2 * 1e-4)
    overlapped = predict(dataclasses.replace(staged, overlapped=True), plan, FakeCosts())
    _assert_lanes_hide_the_exposed_all_to_alls(two, overlapped, pairs=8 - 2)


def test_deferred_weight_steps_fill_the_bubble_where_the_sync_holds_its_reduction() -> None:
    """A split backward's bubble per idle micro-step is micro - 3 W (ZB-H1, ZB-V), W the weight GEMMs of the
    slowest stage's blocks: a forward's GEMMs (the dense forward less what selective recompute runs, attention's
    core and the memory-bound kernels; the experts' forward), of weights that train, the experts' only where
    they run in the input step (not the pipelined exchange's). Only where the gradient sync holds its
    reduction (replicated; fsdp gathered once, reducing once), never below zero."""
    w = dataclasses.replace(small_workload(), micro_steps=8, pp=2, stages_across_machines=True)
    replicated = reference_plan(w, "all_reduce")
    plain = predict(w, replicated, FakeCosts())
    deferred_w = dataclasses.replace(w, deferred_weight_steps=True)
    deferred = predict(deferred_w, replicated, FakeCosts())
    micro = plain.stages["pipeline_bubble"] - 2 * 1e-4  # pp - 1 = 1 idle micro-step and its two sends
    weights = 2 * (1e-4 - 2e-5 + w.routed_rows * 1e-6)  # a stage's two MoE blocks
    assert 0 < micro - 3 * weights < micro
    assert deferred.stages["pipeline_bubble"] == pytest.approx(micro - 3 * weights + 2 * 1e-4)
    assert deferred.step == pytest.approx(plain.step - 3 * weights)
    fsdp = reference_plan(w, "fsdp")
    per_micro_step = predict(deferred_w, dataclasses.replace(fsdp, gather_once=False), FakeCosts())
    gathered_once = predict(deferred_w, dataclasses.replace(fsdp, gather_once=True, reduce_once=True), FakeCosts())
    assert per_micro_step.stages["pipeline_bubble"] == pytest.approx(
        predict(w, dataclasses.replace(fsdp, gather_once=False), FakeCosts()).stages["pipeline_bubble"])
    assert gathered_once.stages["pipeline_bubble"] < per_micro_step.stages["pipeline_bubble"]
    # Only weights that train have a weight step; the pipelined exchange runs its experts in the input step.
    def filled(workload, plan) -> float:
        plain_bubble = predict(workload, plan, FakeCosts()).stages["pipeline_bubble"]
        deferred = dataclasses.replace(workload, deferred_weight_steps=True)
        return plain_bubble - predict(deferred, plan, FakeCosts()).stages["pipeline_bubble"]
    blocks_frozen = dataclasses.replace(w, params=tuple(p for p in w.params if p.expert or p.layer >= w.n_layers))
    assert filled(blocks_frozen, replicated) == pytest.approx(3 * 2 * w.routed_rows * 1e-6)
    chunked = dataclasses.replace(replicated, chunks=(2,) * len(w.moe_layers))
    assert filled(w, chunked) == pytest.approx(3 * 2 * (1e-4 - 2e-5))
    heavier = predict(deferred_w, replicated, _WeightHeavy())
    assert heavier.stages["pipeline_bubble"] == pytest.approx(2 * 1e-4)  # W fills it all: the sends remain


class _WeightHeavy(FakeCosts):
    """Forwards far above their backwards: three W outweigh a micro-step."""

    def dense(self, w, layer, phase):
        return 1e-2 if phase == "fwd" else 1e-3

    def experts(self, w, rows, phase, chunks=1):
        return rows * (1e-5 if phase == "fwd" else 1e-7)


def _assert_lanes_hide_the_exposed_all_to_alls(plain, overlapped, pairs: int) -> None:
    """overlapped_1f1b's pairs each cost max(compute, all-to-all work) of a micro-step instead of compute plus
    its exposed all-to-alls; what is hidden is reported, negative, as lanes_hidden."""
    n = 8
    compute = sum(plain.stages[k] for k in ("dense", "experts", "chunk_overhead") if k in plain.stages) / n
    exposed = (plain.exposed_comm - 2 * 1e-4 - plain.stages["grad_reduce"]) / n  # less the two stage sends
    assert exposed > 0  # r=1: the all-to-alls wait for the experts and the experts for them
    saved = pairs * (compute + exposed - max(compute, plain.stages["a2a"] / n))
    assert saved > 0 and -overlapped.stages["lanes_hidden"] == pytest.approx(saved, rel=1e-6)
    assert overlapped.step == pytest.approx(plain.step - saved)
