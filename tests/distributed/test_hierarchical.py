"""Hierarchical dispatch on 4 gloo ranks as 2 machines x 2 against flat dispatch, and what crosses machines."""
from __future__ import annotations

from helpers import hierarchical_cases
from helpers.exchange_cases import D, K
from helpers.multiprocess import run_distributed


def test_hierarchical_equals_flat_and_sends_each_token_once_per_machine() -> None:
    results = run_distributed(hierarchical_cases.hierarchical_matches_flat, 4, timeout_s=240)
    for rank, r in enumerate(results):
        assert r["worst_rel"] < 1e-6
        for case, t in r["traffic"].items():
            # flat: one row per copy bound off the machine; hierarchical: one per (token, machine), never twice
            assert t["flat_rows"] == t["expected_copies"], (rank, case, t)
            assert t["hier_rows"] == t["expected_pairs"], (rank, case, t)
            # a pair's row carries its K routing weights and K expert ids beside the D values
            assert t["hier_bytes"] == t["hier_rows"] * (D + 2 * K) * 4 and t["flat_bytes"] == t["flat_rows"] * D * 4
            assert t["hier_rows"] <= t["flat_rows"]
        one_node = r["traffic"]["one_node/None"]
        # node-limited to one machine: a token crosses at most once, where flat sends it K times
        assert one_node["hier_rows"] <= one_node["tokens"]
        assert one_node["flat_rows"] == K * one_node["hier_rows"] > 0
        skewed = r["traffic"]["skewed/None"]
        assert skewed["hier_rows"] < skewed["flat_rows"], "skewed routing puts some tokens' 2 copies on one machine"
    assert any(r["traffic"]["skewed/1.0"]["dropped"] > 0 for r in results), "capacity dropped nothing"
    # Every split size of both stages in one host copy (was 2 + 2 per chunk: unique, nonzero, and the
    # node stage's own count exchange), the expert loop (host counts) and the grouped GEMM (device counts).
    for r in results:
        hierarchical = {case: counted for case, counted in r["host_syncs"].items() if case.startswith("hier")}
        # 2 routings x 2 capacities x 3 chunkings, the grouped GEMM once, expert choice x 3 chunkings
        assert len(hierarchical) == 4 * 3 + 1 + 3, sorted(hierarchical)
        for case, (forward, backward, where) in hierarchical.items():
            assert (forward, backward) == (1, 0), (case, where)


def test_hierarchical_under_bf16_autocast() -> None:
    """The packed rows are bf16 (routing weights in three exact parts, ids as raw bits; partial sums rounded
    to bf16 as the flat path's expert outputs are): within bf16 rounding, the routing weights' gradients too."""
    for r in run_distributed(hierarchical_cases.hierarchical_bf16_matches_flat, 4, timeout_s=240):
        assert r["worst_rel"] < 1e-2, f"bf16 hierarchical differs by {r['worst_rel']:.2e} relative"
        assert r["routing_weight_grad_rel"] < 4e-3, r


def test_under_fsdp_expert_gradients_are_reduced_during_backward() -> None:
    """FSDP2 reduce-scatters a unit's gradients when the gradient of its input is computed: the exchange must
    compute from the experts module's own input, or the gathered experts and their gradients live on past
    the layer's backward."""
    for r in run_distributed(hierarchical_cases.expert_grads_reduced_during_backward, 4, timeout_s=240):
        assert all(r["reduced"][key] == [True, True] for key in r["reduced"]), r["reduced"]
        assert r["worst_rel"] < 1e-5


def test_hierarchical_pipelined_in_a_recomputed_block_equals_keeping_everything() -> None:
    """train.recompute=full with hierarchical dispatch in 2 chunks (4 ranks as 2 machines x 2): the executor
    runs its chunks again in backward, fan-out collectives included, in the same order on every rank; the
    gradients equal no recompute within 1e-6."""
    for r in run_distributed(hierarchical_cases.hierarchical_in_a_recomputed_block, 4, timeout_s=240):
        assert r["worst_rel"] < 1e-6, r["worst_rel"]
        assert r["executor_reruns"] == 2, r  # the forward and its recomputation took the rerun path
