"""Checks of the GPU path that need no test framework, for benchmarks/gpu_check.sh.

    python benchmarks/gpu_probe.py grouped [--device cpu]   # padded grouped GEMM vs a float32 loop
    python benchmarks/gpu_probe.py syncs [--device cpu]     # MoE layer fwd+bwd under sync debug mode
    python benchmarks/gpu_probe.py attention [--device cpu --smoke]  # each attention path's kernel and speed
    python benchmarks/gpu_probe.py fp8 [--device cpu --smoke]        # train.fp8's GEMMs against bf16's

grouped: row counts with zeros (and one expert holding most rows) through `expert_mlp_grouped_mm` in the
device's compute dtype (bf16 on CUDA, float32 on CPU) against the float32 reference, for SwiGLU experts and
for GPT-OSS's (biases, clamped SwiGLU): the worst relative error of outputs and weight gradients, and
whether the empty experts' gradients are exactly zero.
syncs: ep=1, dropless, grouped GEMM, bf16 autocast on CUDA: a warm-up step, then one forward and backward
under torch.cuda.set_sync_debug_mode("warn"); every warning is a host sync (on CPU the mode does not
exist: the step runs, and tests/distributed/test_host_syncs.py counts the syncs by kind).
fp8: train.fp8=rowwise's linear layer (DeepSeek-V3's 7168-wide projections at 4096 rows) and expert layer
(16 local experts of 7168 x 2048, 2048 rows each, as its pp 16 x ep 16 plan has them) forward + backward
against the same in bf16: ms of each, the ratio, and one cast's ms and bytes an element moved at the
device's bandwidth (the planner's fp8_gemm_tflops and its 9-byte eager cast, models/float8.py, are what this
calibrates); the check is the outputs' and gradients' error against bf16's (speed is reported, not judged).
Each prints one JSON line and exits non-zero when its check fails.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer_gpu  # noqa: E402

from moeyard.models import MoE, MoEConfig  # noqa: E402
from moeyard.models.moe.expert_mlp import ExpertActivation, expert_mlp_reference
from moeyard.models.moe.experts import expert_mlp_grouped_mm, grouped_mm_unsupported

COUNTS = [0, 37, 0, 128, 1, 0, 255, 64]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def grouped(device: torch.device) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    E, D, F = len(COUNTS), 256, 512
    x = torch.randn(sum(COUNTS), D, device=device)
    dy = torch.randn(sum(COUNTS), D, device=device)
    empty = [e for e, n in enumerate(COUNTS) if n == 0]
    output_err, grad_err, zero = 0.0, 0.0, True
    for biased, activation in ((False, ExpertActivation()), (True, ExpertActivation("swiglu_clamped"))):
        shapes = [(E, D, F), (E, D, F), (E, F, D)] + ([(E, F), (E, F), (E, D)] if biased else [])
        weights = [torch.randn(*shape, device=device) * 0.05 for shape in shapes]
        ref_w = [w.clone().requires_grad_() for w in weights]
        ref = expert_mlp_reference(x, COUNTS, ref_w, activation)
        ref_grads = torch.autograd.grad((ref * dy).sum(), ref_w)
        low_w = [w.to(dtype).requires_grad_() for w in weights]
        out = expert_mlp_grouped_mm(x.to(dtype), torch.tensor(COUNTS, device=device), low_w, activation)
        grads = torch.autograd.grad((out.float() * dy).sum(), low_w)
        output_err = max(output_err, _rel(out, ref))
        grad_err = max(grad_err, max(_rel(g, r) for g, r in zip(grads, ref_grads)))
        zero = zero and all(int(torch.count_nonzero(g[empty])) == 0 for g in grads)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "torch": torch.__version__, "fast_kernel": ("no: torch's CPU loop" if device.type == "cpu"
                                                       else grouped_mm_unsupported(x.to(dtype)) or "yes"),
        "counts": COUNTS, "mlps": "swiglu, biased clamped swiglu", "output_rel_err": output_err,
        "weight_grad_rel_err": grad_err, "empty_experts_zero_grad": zero,
    }
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    result["ok"] = (result["output_rel_err"] < tolerance and result["weight_grad_rel_err"] < tolerance
                    and result["empty_experts_zero_grad"])
    return result


def syncs(device: torch.device) -> dict:
    torch.manual_seed(0)
    moe = MoE(512, MoEConfig(num_experts=8, top_k=2, ffn_dim=1024, expert_compute="grouped_mm")).to(device)
    x = torch.randn(4, 512, 512, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            y, stats = moe(x)
            loss = y.float().square().mean() + stats.aux_loss
        loss.backward()

    step()  # lazy initialisation may sync once
    if device.type != "cuda":
        step()
        return {"device": "cpu", "host_syncs": None, "ok": True,
                "note": "no sync debug mode on CPU; tests/distributed/test_host_syncs.py counts by kind"}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"device": torch.cuda.get_device_name(device), "host_syncs": len(found), "first": found[:3],
            "ok": not found}


def attention(device: torch.device, smoke: bool = False) -> dict:
    """Each attention path (MLA's narrower values, GPT-OSS's sinks + window 128, packed documents) at one
    size: the kernel the start-up log names, whether a fallback warning fired, its output against the
    unfused path of the same device, and fwd+bwd ms against plain causal SDPA of the same size. On a CPU
    each path is its unfused form (the output check is 0 by construction there: the smoke checks the
    probe itself)."""
    import torch.nn.functional as F

    from moeyard.models.attention_kernels import (
        Target,
        flex_release_limit,
        flex_unsupported,
        kernel_names,
        varlen_release_limit,
        varlen_unsupported,
    )
    from moeyard.models.document_attention import DocumentSpans, document_attention
    from moeyard.models.latent_attention import causal_attention
    from moeyard.models.local_attention import _one_sequence, local_attention

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, J, T = (1, 4, 2, 256) if smoke else (2, 64, 8, 4096)
    target = Target.of(torch.empty(0, device=device, dtype=dtype))
    reps = 2 if smoke else 10
    timed_ms = functools.partial(moe_layer_gpu.timed_ms, warmup=1)  # the warm-up also compiles

    def leaves(*shapes):
        return [torch.randn(*shape, device=device, dtype=dtype).requires_grad_() for shape in shapes]

    def fwd_bwd(fn, inputs):
        def run():
            for t in inputs:
                t.grad = None
            fn(*inputs).float().square().mean().backward()
        return run

    def measured(kernel: str, fused, unfused, shapes: list[tuple[int, ...]], plain_width: int) -> dict:
        """`fused(q, k, v)` against `unfused` on the same inputs, and both timings against plain causal SDPA
        with queries, keys and values of `plain_width` dims."""
        inputs = leaves(*shapes)
        plain = leaves(*[shape[:-1] + (plain_width,) for shape in shapes])
        return {"kernel": kernel, "rel_err": _rel(fused(*inputs), unfused(*inputs)),
                "ms": timed_ms(fwd_bwd(fused, inputs), device, reps=reps),
                "plain_causal_ms": timed_ms(fwd_bwd(lambda *t: F.scaled_dot_product_attention(
                    *t, is_causal=True, enable_gqa=t[0].shape[1] != t[1].shape[1]), plain), device, reps=reps)}

    pad = target.why_no_flash() is None
    sinks = torch.randn(H, device=device, requires_grad=True)  # nonzero: a sign or scale slip shows
    segment = torch.arange(8).repeat_interleave(T // 8).repeat(B, 1)  # 8 packed documents per row
    docs = DocumentSpans.from_segments(segment, device)

    def one_sdpa_per_document(q, k, v):
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:a + T // 8], k[:, :, a:a + T // 8],
                                                         v[:, :, a:a + T // 8], is_causal=True, enable_gqa=True)
                          for a in range(0, T, T // 8)], dim=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = {
            # MLA: q/k 192 dims, values 128.
            "mla": measured(kernel_names("mla", False, 0, target, documents=False)[0],
                            lambda *t: causal_attention(*t, 192 ** -0.5, pad),
                            lambda *t: causal_attention(*t, 192 ** -0.5, False),
                            [(B, H, T, 192), (B, H, T, 192), (B, H, T, 128)], 192),
            # GPT-OSS: GQA, head dim 64, window 128, sinks.
            "sinks_window": measured(kernel_names("gqa", True, 128, target, documents=False)[0],
                                     lambda *t: local_attention(*t, scale=0.125, window=128, sinks_H=sinks),
                                     lambda *t: _one_sequence(*t, 0.125, 128, sinks),
                                     [(B, H, T, 64), (B, J, T, 64), (B, J, T, 64)], 64),
            "documents": measured(kernel_names("gqa", False, 0, target)[1],
                                  lambda *t: document_attention(*t, docs), one_sdpa_per_document,
                                  [(B, H, T, 128), (B, J, T, 128), (B, J, T, 128)], 128),
        }
    # A fallback the release explains (no FlexAttention, a varlen_attn without a causal mode) is a note; any
    # other fallback on a GPU fails the step.
    fallbacks = sorted({str(w.message) for w in caught if "falls back" in str(w.message)})
    release_limits = [why for why in (flex_release_limit(), varlen_release_limit()) if why is not None]
    unexplained = [f for f in fallbacks if not any(why in f for why in release_limits)]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for path in paths.values():
        path["vs_plain_causal"] = path["ms"] / path["plain_causal_ms"]
    on_gpu = device.type == "cuda"
    unfused = {"mla": target.why_no_flash(), "sinks_window": flex_unsupported(target),
               "documents": varlen_unsupported(target)}
    for name, why in unfused.items():
        paths[name]["fused"] = why is None
    fused_named = all(why is None or why in release_limits for why in unfused.values()) if on_gpu else True
    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "dtype": str(dtype),
            "shape": {"B": B, "H": H, "J": J, "T": T}, "paths": paths, "fallback_warnings": fallbacks,
            "release_limits": release_limits,
            "ok": all(p["rel_err"] < tolerance for p in paths.values()) and not (on_gpu and unexplained)
            and fused_named}


def fp8(device: torch.device, smoke: bool = False) -> dict:
    from moeyard.models import GroupedExperts
    from moeyard.models.float8 import float8_unsupported, pack_rows, quantize_rows, unpack_rows
    from moeyard.models.weight_steps import Linear

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reason = float8_unsupported(device, dtype)
    if reason is not None:
        return {"device": str(device), "fp8": reason, "ok": False}
    M, D, F, E = (64, 64, 32, 2) if smoke else (4096, 7168, 2048, 16)
    reps = 2 if smoke else 10
    timed_ms = functools.partial(moe_layer_gpu.timed_ms, warmup=1, reps=reps)

    def run(module, fp8_on: bool, *inputs) -> tuple[float, list[torch.Tensor]]:
        module.fp8 = fp8_on
        leaves = [x.detach().clone().requires_grad_() for x in inputs[:1]]

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                y = module(leaves[0], *inputs[1:])
            y.float().square().mean().backward()
            return y

        ms = timed_ms(step, device)
        for p in module.parameters():
            p.grad = None
        leaves[0].grad = None
        y = step()
        # copies: the next run's backward accumulates into these gradient tensors in place
        return ms, [t.detach().clone() for t in [y, leaves[0].grad, *(p.grad for p in module.parameters())]]

    rows = {}
    linear = Linear(D, D, bias=False).to(device)
    experts = GroupedExperts(E, D, F).to(device)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x_linear = torch.randn(M, D, device=device)
    x_experts = torch.randn(M * E // 2, D, device=device)
    counts = [M // 2] * E
    for name, module, inputs in (("linear", linear, (x_linear,)),
                                 ("experts", experts, (x_experts, counts if device.type == "cpu" else
                                                       torch.tensor(counts, device=device)))):
        plain_ms, plain = run(module, False, *inputs)
        fp8_ms, got = run(module, True, *inputs)
        rows[name] = {"bf16_ms" if dtype == torch.bfloat16 else "float32_ms": plain_ms, "fp8_ms": fp8_ms,
                      "fp8_over_plain": fp8_ms / plain_ms, "rel_err": max(_rel(g, w) for g, w in zip(got, plain))}
    operand = torch.randn(M * E // 2, D, device=device, dtype=dtype)
    cast_ms = timed_ms(lambda: quantize_rows(operand), device)
    peak_gbps = None
    if device.type == "cuda":
        copy_ms = timed_ms(lambda: operand.clone(), device)
        peak_gbps = 2 * operand.numel() * operand.element_size() / copy_ms / 1e6
    cast = {"ms": cast_ms, "elements": operand.numel(), "copy_gbps": peak_gbps,
            "bytes_per_element_at_copy_rate": (cast_ms * 1e6 * peak_gbps / operand.numel()) if peak_gbps else None}
    # train.fp8_dispatch's packing (sender) and unpacking (receiver): the cost model's fp8_dispatch_bytes
    packed = pack_rows(operand)
    dispatch_ms = timed_ms(lambda: pack_rows(operand), device) + timed_ms(lambda: unpack_rows(packed, dtype), device)
    cast["dispatch_pack_unpack_ms"] = dispatch_ms
    cast["dispatch_bytes_per_element_at_copy_rate"] = (dispatch_ms * 1e6 * peak_gbps / operand.numel()
                                                       if peak_gbps else None)
    cast["dispatch_round_trip_exact"] = torch.equal(unpack_rows(packed, dtype).float(),
                                                    torch.mul(*(t.float() for t in quantize_rows(operand))))
    tolerance = 0.1
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "shapes": {"rows": M, "dim": D, "expert_hidden": F, "experts": E},
            "layers": rows, "cast": cast,
            "ok": all(r["rel_err"] < tolerance for r in rows.values()) and cast["dispatch_round_trip_exact"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["grouped", "syncs", "attention", "fp8"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="attention, fp8: tiny shapes")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.check in ("attention", "fp8"):
        result = {"attention": attention, "fp8": fp8}[args.check](device, args.smoke)
    else:
        result = {"grouped": grouped, "syncs": syncs}[args.check](device)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
