"""FSDP2 with expert parallelism over real gloo groups: each rank holds a shard of every dense parameter
and of its experts, and the gradients it ends a step with, gathered, are plain backprop's of the global batch."""
from __future__ import annotations

import pytest
from helpers import step_cases
from helpers.multiprocess import run_distributed


@pytest.mark.parametrize("world,ep,micro_batch_size,recompute", [
    (2, 2, 2, "none"),  # edp = 1: experts whole on their rank, dense sharded over 2
    (4, 2, 1, "full"),  # edp = 2: experts sharded too; two accumulated micro-steps; blocks recomputed
    (4, 4, 2, "experts"),
    (2, 1, 1, "none"),  # no expert parallelism: every expert sharded over dp
])
def test_fsdp_gradients_equal_single_process_backprop(world, ep, micro_batch_size, recompute) -> None:
    results = run_distributed(step_cases.fsdp_step_gradients_match_single_process, world, ep, micro_batch_size,
                              recompute)
    for r in results:
        bad = {name: err for name, err in r["worst"].items() if err > 1e-5}
        assert not bad, f"gradients differ from the reference (relative norm of the difference): {bad}"
        assert r["grad_norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
        assert r["lm_loss"] == pytest.approx(r["ref_lm_loss"], rel=1e-5)
        assert r["dense_sharded"], "a dense matrix is whole on a rank"
        assert r["experts_sharded"] == (world // ep > 1), "experts are sharded exactly when edp > 1"
