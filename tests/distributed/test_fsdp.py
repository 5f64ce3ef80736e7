"""FSDP2 with expert parallelism over real gloo groups: each rank holds a shard of every dense parameter
and of its experts, and the gradients it ends a step with, gathered, are plain backprop's of the global batch."""
from __future__ import annotations

import pytest
from helpers import step_cases
from helpers.multiprocess import run_distributed


@pytest.mark.parametrize("world,ep,micro_batch_size,recompute,num_experts", [
    (2, 2, 2, "none", 8),  # edp = 1: experts whole on their rank, dense sharded over 2
    (4, 2, 1, "full", 8),  # edp = 2: experts sharded too; two accumulated micro-steps; blocks recomputed
    (4, 4, 2, "experts", 8),
    (4, 2, 1, "selective", 8),  # GEMM outputs kept inside FSDP units, the exchange outside the regions
    (2, 1, 1, "none", 8),  # no expert parallelism: every expert sharded over dp
    (4, 1, 1, "none", 2),  # 2 experts over edp 4: split on dim 1 (w_gate/w_up: model dim; w_down: hidden)
    (4, 2, 2, "none", 2),  # 1 expert per ep rank over edp 2
])
def test_fsdp_gradients_equal_single_process_backprop(world, ep, micro_batch_size, recompute, num_experts) -> None:
    results = run_distributed(step_cases.fsdp_step_gradients_match_single_process, world, ep, micro_batch_size,
                              recompute, num_experts)
    for r in results:
        bad = {name: err for name, err in r["worst"].items() if err > 1e-5}
        assert not bad, f"gradients differ from the reference (relative norm of the difference): {bad}"
        assert r["grad_norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
        assert r["lm_loss"] == pytest.approx(r["ref_lm_loss"], rel=1e-5)
        assert r["dense_sharded"], "a dense matrix is whole on a rank"
        assert r["experts_sharded"] == (world // ep > 1), "experts are sharded exactly when edp > 1"
    # Every rank holds the same share of its experts, whole experts where they split evenly over edp.
    assert len({r["expert_shard_numel"] for r in results}) == 1, [r["expert_shard_numel"] for r in results]
    local_experts, edp = num_experts // ep, world // ep
    assert results[0]["expert_shard_dims"] == ([0] if local_experts % edp == 0 else [1])
    # The memory model's largest rank is the real one (every shard even here, so no padding).
    assert max(r["shard_numel"] for r in results) == results[0]["predicted_shard_numel"]


@pytest.mark.parametrize("gather_once", [True, False], ids=["once", "every_micro_step"])
def test_gather_once_per_step_collectives_and_gradients(gather_once) -> None:
    """4 micro-steps on 4 ranks (ep 2, edp 2): gathering once per step gives plain backprop's gradients
    with one all-gather and one reduce-scatter per FSDP unit in the step; per micro-step FSDP2 reduces
    every unit in every micro-step and gathers each block twice (forward, backward)."""
    micro_steps = 4
    results = run_distributed(step_cases.fsdp_step_gradients_match_single_process, 4, 2, 1, "none", 8, gather_once,
                              micro_steps)
    for r in results:
        bad = {name: err for name, err in r["worst"].items() if err > 1e-5}
        assert not bad, f"gradients differ from the reference (relative norm of the difference): {bad}"
        assert r["grad_norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
        assert r["sharded_after_eval"], "an evaluation left gathered plain tensors where the DTensor shards were"
        units = r["units"]  # the root, 3 blocks and 2 MoE layers' experts
        assert units == 6
        if gather_once:
            assert (r["all_gather_single"], r["reduce_scatter_single"]) == (units, units)
        else:
            assert r["reduce_scatter_single"] == micro_steps * units
            assert r["all_gather_single"] == micro_steps * (2 * (units - 1) + 1)
