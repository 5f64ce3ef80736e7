"""Token exchange over real gloo process groups against the one-process computation."""
from __future__ import annotations

import pytest
from helpers import exchange_cases
from helpers.multiprocess import run_distributed


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_dropless_round_trip_with_skewed_routing(world: int, ep: int) -> None:
    results = run_distributed(exchange_cases.dispatch_round_trip, world, ep, None)
    routed = results[0]["routed"]
    assert all(r["routed"] == routed for r in results), "ranks disagree on the global expert load"
    assert routed[exchange_cases.COLD] == 0
    assert routed[exchange_cases.HOT] == max(routed) > 0.35 * sum(routed)
    assert sum(routed) == world * exchange_cases.T * exchange_cases.K
    assert all(r["dropped"] == 0 for r in results)


def test_capacity_mode_drops_and_counts_globally() -> None:
    results = run_distributed(exchange_cases.dispatch_round_trip, 2, 2, 1.0)
    capacity = results[0]["capacity"]
    assert capacity == 12  # ceil(1.0 * 48 tokens * 2 / 8 experts)
    for r in results:
        assert max(r["kept_per_expert"]) == capacity  # the hot expert is cut at capacity
        assert r["local_dropped"] > 0
    assert results[0]["dropped"] == sum(r["local_dropped"] for r in results)
    total = sum(results[0]["routed"])
    assert 0 < results[0]["dropped"] / total < 1


def test_rank_whose_experts_get_no_rows_still_joins_and_gets_a_zero_gradient() -> None:
    results = run_distributed(exchange_cases.zero_rows_for_one_rank, 2)
    assert results[0]["grad_norm"] > 0
    # rank 1 computed nothing but joined the backward all-to-all: its expert weights get a zero gradient
    assert results[1]["grad_is_none"] == [False, False, False]
    assert results[1]["grad_norm"] == 0


@pytest.mark.parametrize("world,ep,capacity_factor", [(2, 2, None), (4, 4, None), (4, 2, None), (2, 2, 1.0)])
def test_pipelined_chunks_match_plain_exchange(world, ep, capacity_factor) -> None:
    """r = 2, 4 (and more chunks than some experts have rows) equal r = 1 within 1e-6, forward and backward."""
    results = run_distributed(exchange_cases.pipelined_matches_plain, world, ep, capacity_factor, (2, 4, 16))
    assert all(r["worst_rel"] < 1e-6 for r in results)


def test_pipelined_chunks_under_bf16_autocast() -> None:
    """r=4 equals r=1 to bf16 rounding (8 bits of mantissa); weight gradients stay float32."""
    for r in run_distributed(exchange_cases.pipelined_bf16_matches_plain, 2):
        assert r["grad_dtypes"] == ["torch.float32"] * 3
        assert r["worst_rel"] < 1e-2, f"bf16 pipelined differs by {r['worst_rel']:.2e} relative"


def test_pipelined_fp8_experts_cast_each_weight_once_a_pass() -> None:
    """train.fp8 in the pipelined exchange: r = 4 equals r = 1 to float32 rounding (FP8 scales are per row,
    so chunking changes no cast), and each local expert's three weights are quantized once forward and once
    backward (the input gradient's orientation) whatever the chunks: not once per chunk."""
    for r in run_distributed(exchange_cases.pipelined_fp8_casts_each_weight_once, 2):
        assert r["weight_casts"] == [6 * r["local_experts"]] * 2, r["weight_casts"]
        assert r["worst_rel"] < 1e-6, f"fp8 pipelined r=4 differs from r=1 by {r['worst_rel']:.2e} relative"


def test_fp8_dispatch_sends_e4m3_rows_that_multiply_as_before() -> None:
    """train.fp8_dispatch (2 ranks, plain and pipelined): the rows go out as e4m3 bytes with a 4-byte scale
    (D + 4 bytes, not 4 D), everything else (outputs back, gradients both ways) in float32; the FP8 experts'
    outputs and the input gradients equal those of FP8 experts fed float32 rows bit for bit (unpack_rows then
    quantize_rows is exact); only the gate's and up's weight gradients, computed from the rounded rows, move
    (by e4m3's rounding: a few percent); the down projection's (from the hidden rows) does not."""
    D = exchange_cases.D
    for r in run_distributed(exchange_cases.fp8_dispatch_matches_fp8_experts, 2):
        for chunks, got in r.items():
            assert got["same_output"] and got["same_input_grad"], chunks
            gate, up, down = got["weight_grad_rel"]
            assert 1e-4 < gate < 0.1 and 1e-4 < up < 0.1 and down == 0.0, (chunks, got["weight_grad_rel"])
            sent = got["payloads"]
            dispatches = chunks  # forward: a dispatch per chunk, then the combines; backward: both ways
            assert sent[:dispatches] == [("torch.uint8", D + 4)] * dispatches, (chunks, sent)
            assert sent[dispatches:] == [("torch.float32", D)] * (len(sent) - dispatches) and sent[dispatches:], sent


def test_pipelined_exchange_in_a_recomputed_block_keeps_nothing_for_backward() -> None:
    """train.recompute=full with the pipelined exchange (2 ranks, r = 2): gradients equal no recompute within
    1e-6, and three micro-batches in flight under bf16 autocast keep none of their received rows or bf16
    weight copies (without the checkpoint they do: the count that checks the counting), which the memory
    model's full recompute (a block's input only) assumes."""
    for r in run_distributed(exchange_cases.pipelined_in_a_recomputed_block, 2):
        assert r["worst_rel"] < 1e-6, r["worst_rel"]
        assert r["plain"][0] >= 3 and r["plain"][1] >= 3, r["plain"]
        assert r["recomputed"] == (0, 0), r["recomputed"]
