"""The cost and memory models' counts of MLA, MTP and sliding windows, against the model they describe."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moeyard.models import ModelConfig, MoEConfig, Transformer
from moeyard.models.config import MLAConfig
from moeyard.models.weight_steps import Linear
from moeyard.trainer.scheduler.block_shapes import attention_core_flops, attention_shape, block_index
from moeyard.trainer.scheduler.cost_model import moe_layer_timeline, workload_for
from moeyard.trainer.scheduler.hardware import Hardware, HardwareCosts
from moeyard.trainer.scheduler.memory_model import Layout, count_parameters, predict_memory, predict_stage, stage_counts

MOE = MoEConfig(num_experts=4, top_k=2, ffn_dim=16)
SHAPES = {
    "gqa": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=48, moe=MOE),
    "mla": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, attention="mla", ffn_dim=48, moe=MOE,
                       mla=MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                     v_head_dim=6)),
}


def test_attention_projection_count_is_the_models_own() -> None:
    for kind, cfg in SHAPES.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        weights = sum(p.numel() for n, p in model.layers[0].attn.named_parameters() if p.dim() == 2)
        assert attention_shape(cfg).projection_weights == weights, kind
        assert attention_shape(cfg).out == model.layers[0].attn.wo.in_features, kind


def test_mtp_blocks_and_heads_are_counted() -> None:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, moe=MOE, mtp_layers=2)
    plain = workload_for(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, moe=MOE),
                         tokens=64, seq_len=32, ep=1, dp=1, micro_steps=1)
    w = workload_for(cfg, tokens=64, seq_len=32, ep=1, dp=1, micro_steps=1)
    assert w.n_layers == 4 and w.moe_layers == (0, 1, 2, 3) and w.head_flops == 3 * plain.head_flops
    assert w.dense_flops[2] == plain.dense_flops[1] + 2 * 64 * 2 * 32 * 32  # an MTP block: its eh_proj too
    with torch.device("meta"):
        model = Transformer(cfg)
    blocks = {block_index(n, cfg) for n, _ in model.named_parameters()}
    assert blocks == {-1, 0, 1, 2, 3, 4}  # embedding, 2 decoder blocks, 2 MTP depths, head
    counts = count_parameters(cfg, 1)
    assert counts.dense + counts.experts == sum(p.numel() for p in model.parameters())


def test_sliding_window_core_flops_count_the_keys_each_query_sees() -> None:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, moe=MOE, sliding_window=5,
                      layer_types=["sliding", "full"])
    T, a = 32, attention_shape(cfg)
    keys = sum(min(i + 1, 5) for i in range(T))  # one sequence, brute force
    assert attention_core_flops(cfg, T, T, 0) == 2 * keys * (a.q + a.out)
    assert attention_core_flops(cfg, T, T, 1) == 2 * T * (T / 2) * (a.q + a.out)
    assert attention_core_flops(cfg, 4, 4, 0) == attention_core_flops(cfg, 4, 4, 1)  # a window wider than T


def test_fp8_gemms_are_the_models_fp8_layers_at_their_rate_with_their_casts() -> None:
    """train.fp8: the cost model's FP8 layers are the ones Transformer.set_fp8 picks (MLA's projections, the
    shared expert, an MTP depth's eh_proj; not the 20-wide wkv_a or the routers); each block's FP8 FLOPs move
    from the GEMM rate to the FP8 rate, and its casts cost memory bandwidth: forward the input rows and the
    weight, backward the output gradient twice, the input and the weight. The routed experts' forward and
    input-gradient GEMMs move to the FP8 rate, with their casts; their weight gradients stay."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, attention="mla", ffn_dim=48, mtp_layers=1,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16, num_shared_experts=1),
                      mla=MLAConfig(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                    v_head_dim=8))
    model = Transformer(cfg)
    model.set_fp8("rowwise")
    w = workload_for(cfg, tokens=64, seq_len=32, ep=1, dp=1, micro_steps=1, act_bytes=2, fp8="rowwise")
    for block, owner in enumerate([*model.layers, *model.mtp]):
        want = sorted((m.in_features, m.out_features) for m in owner.modules() if isinstance(m, Linear) and m.fp8)
        assert sorted(w.fp8_linears_of(block)) == want and want, block
    assert {(32, 32), (32, 48), (16, 64)} <= set(w.fp8_linears_of(0))  # wq_a, wq_b, wkv_b, wo
    assert (32, 16 + 4) not in w.fp8_linears_of(0) and (64, 32) in w.fp8_linears_of(2)  # wkv_a; eh_proj
    assert workload_for(cfg, tokens=64, seq_len=32, ep=1, dp=1, micro_steps=1).fp8_linears == ()

    plain = workload_for(cfg, tokens=64, seq_len=32, ep=1, dp=1, micro_steps=1, act_bytes=2)
    hw = dict(name="t", devices_per_node=8, gemm_tflops=100.0, intra_node_gbps=1.0, intra_node_latency_us=1.0,
              inter_node_gbps=1.0, inter_node_latency_us=1.0, memory_gbps=1000.0)
    same = HardwareCosts(Hardware(**hw, fp8_gemm_tflops=100.0))  # FP8 at the bf16 rate: only the casts differ
    double = HardwareCosts(Hardware(**hw, fp8_gemm_tflops=200.0))
    for block in range(w.n_layers):
        widths, m = w.fp8_linears_of(block), 64
        fwd = sum(m * k + k * n for k, n in widths) * 5 / 1e12
        bwd = sum(2 * m * n + m * k + k * n for k, n in widths) * 5 / 1e12
        assert same.dense(w, block, "fwd") - same.dense(plain, block, "fwd") == pytest.approx(fwd, rel=1e-9)
        assert same.dense(w, block, "bwd") - same.dense(plain, block, "bwd") == pytest.approx(bwd, rel=1e-9)
        halved = sum(2 * m * k * n for k, n in widths) / 200e12
        assert same.dense(w, block, "fwd") - double.dense(w, block, "fwd") == pytest.approx(halved, rel=1e-9)
    # the routed experts (dim 32, hidden 16): forward and input gradient in FP8, weight gradients not
    assert w.fp8_experts and not plain.fp8_experts
    rows, d, f, weights = 128, 32, 16, 3 * 4 * 32 * 16
    fwd_casts, bwd_casts = (rows * (2 * d + f) + weights) * 5 / 1e12, (rows * (d + 2 * f) + weights) * 5 / 1e12
    gemms = 6 * rows * d * f / 100e12
    assert same.experts(w, rows, "fwd") - same.experts(plain, rows, "fwd") == pytest.approx(fwd_casts, rel=1e-9)
    assert same.experts(w, rows, "bwd") - same.experts(plain, rows, "bwd") == pytest.approx(bwd_casts, rel=1e-9)
    assert same.experts(w, rows, "bwd") - double.experts(w, rows, "bwd") == pytest.approx(gemms / 2, rel=1e-9)
    # a pipelined pass in 4 chunks casts the weights once (shared_weight_casts): its chunks add up to one pass
    for phase in ("fwd", "bwd"):
        assert 4 * same.experts(w, rows / 4, phase, chunks=4) == pytest.approx(same.experts(w, rows, phase), rel=1e-9)
    assert 4 * same.experts(w, rows / 4, "fwd") > same.experts(w, rows, "fwd")  # a cast per chunk would cost more


@pytest.mark.parametrize("recompute,lanes,orientations", [("none", False, 1), ("full", False, 2),
                                                          ("experts", False, 2), ("selective", False, 2),
                                                          ("none", True, 2), ("full", True, 3)])
def test_fp8_experts_hold_one_blocks_weight_casts_through_its_pass(recompute: str, lanes: bool,
                                                                   orientations: int) -> None:
    """train.fp8: the memory model counts one MoE block's local experts' FP8 weight casts at the peak, a byte
    an element: both orientations where backward runs the experts' forward again (recompute experts,
    selective's grouped-GEMM checkpoint, full's rerun by the pipelined exchange), one more for the other
    lane's forward; nothing for a dense-only stage."""
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=4, ffn_dim=48,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=16, first_dense_layers=1))
    layout = Layout(world=4, ep=2, tokens=64, recompute=recompute, act_bytes=2, lanes=lanes)
    fp8 = dataclasses.replace(layout, fp8_experts=True)
    local = 3 * (8 // 2) * 32 * 16
    assert predict_memory(cfg, fp8).activations - predict_memory(cfg, layout).activations == orientations * local
    dense_only = [dataclasses.replace(x, pp=3, pipeline="1f1b") for x in (layout, fp8)]
    first = [predict_stage(cfg, x, stage_counts(cfg, x)[0], 0) for x in dense_only]  # block 0 only: dense
    assert first[1].activations == first[0].activations


def test_fp8_dispatch_halves_the_forward_dispatch_and_charges_its_packing() -> None:
    """train.fp8_dispatch in the cost model: the forward's dispatches carry D + 4 bytes a row instead of 2 D
    (bf16), the forward's combines and the backward's exchanges stay; the forward adds the sender's packing
    (before the first dispatch) and each chunk's unpacking at memory bandwidth, as expert work; the backward
    and the experts' own costs are unchanged. Without ep there is nothing to send."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32))
    shape = dict(tokens=256, seq_len=64, dp=4, micro_steps=1, act_bytes=2, fp8="rowwise")
    fp8 = workload_for(cfg, ep=4, **shape)
    packed = workload_for(cfg, ep=4, fp8_dispatch=True, **shape)
    alone = workload_for(cfg, ep=1, fp8_dispatch=True, **shape)
    assert packed.fp8_dispatch and not fp8.fp8_dispatch and not alone.fp8_dispatch
    assert packed.fp8_dispatch_bytes == pytest.approx(fp8.a2a_bytes * (64 + 4) / (2 * 64))
    hw = HardwareCosts(Hardware(name="t", devices_per_node=8, gemm_tflops=100.0, intra_node_gbps=10.0,
                                intra_node_latency_us=0.0, inter_node_gbps=1.0, inter_node_latency_us=0.0,
                                memory_gbps=1000.0, fp8_gemm_tflops=200.0))
    rows = packed.routed_rows
    assert hw.fp8_dispatch_casts(packed, rows) == pytest.approx((rows * 64 * 5 / 1e12, rows * 64 * 7 / 1e12))
    for phase in ("fwd", "bwd"):
        assert hw.experts(packed, rows, phase) == hw.experts(fp8, rows, phase)
    timelines = {name: moe_layer_timeline(w, hw, 2) for name, w in (("fp8", fp8), ("packed", packed))}
    casts = {name: t.work("compute", "moe.fwd.experts_") for name, t in timelines.items()}
    assert casts["packed"] == pytest.approx(rows * 64 * (5 + 7) / 1e12) and casts["fp8"] == 0.0
    assert timelines["packed"].work("compute", "moe.bwd") == timelines["fp8"].work("compute", "moe.bwd")
    work = {name: {(k, way): t.work("comm", f"moe.{k}.a2a_{way}") for k in ("fwd", "bwd") for way in ("in", "out")}
            for name, t in timelines.items()}
    assert work["packed"][("fwd", "in")] == pytest.approx(work["fp8"][("fwd", "in")] * 68 / 128)
    for key in (("fwd", "out"), ("bwd", "in"), ("bwd", "out")):
        assert work["packed"][key] == work["fp8"][key] > 0, key


def test_full_recompute_with_chunks_runs_the_experts_forward_again_in_backward() -> None:
    """train.recompute=full and the pipelined exchange: the executor keeps only its received rows and runs the
    experts' forward again in backward (parallel/exchange/overlap.py), charged as one more forward of the
    experts in the backward pass; at one chunk (the plain exchange) there is nothing to rerun."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32))
    shape = dict(tokens=256, seq_len=64, ep=4, dp=4, micro_steps=1, act_bytes=2)
    hw = HardwareCosts(Hardware(name="t", devices_per_node=8, gemm_tflops=100.0, intra_node_gbps=10.0,
                                intra_node_latency_us=0.0, inter_node_gbps=1.0, inter_node_latency_us=0.0,
                                memory_gbps=1000.0))
    full, kept = workload_for(cfg, recompute="full", **shape), workload_for(cfg, **shape)
    forward = hw.experts(full, full.routed_rows, "fwd")
    for chunks, extra in ((1, 0.0), (2, forward)):
        got = moe_layer_timeline(full, hw, chunks).work("compute", "moe.bwd.experts")
        want = moe_layer_timeline(kept, hw, chunks).work("compute", "moe.bwd.experts")
        assert got == pytest.approx(want + extra), chunks
