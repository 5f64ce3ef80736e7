"""Checks of the GPU path that need no test framework, for benchmarks/gpu_check.sh.

    python benchmarks/gpu_probe.py grouped [--device cpu]   # padded grouped GEMM vs a float32 loop
    python benchmarks/gpu_probe.py syncs [--device cpu]     # MoE layer fwd+bwd under sync debug mode

grouped: row counts with zeros (and one expert holding most rows) through `expert_mlp_grouped_mm` in the
device's compute dtype (bf16 on CUDA, float32 on CPU) against the float32 reference, for SwiGLU experts and
for GPT-OSS's (biases, clamped SwiGLU): the worst relative error of outputs and weight gradients, and
whether the empty experts' gradients are exactly zero.
syncs: ep=1, dropless, grouped GEMM, bf16 autocast on CUDA: a warm-up step, then one forward and backward
under torch.cuda.set_sync_debug_mode("warn"); every warning is a host sync (on CPU the mode does not
exist: the step runs, and tests/distributed/test_host_syncs.py counts the syncs by kind).
Each prints one JSON line and exits non-zero when its check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from moeyard.models import MoE, MoEConfig
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["grouped", "syncs"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    result = {"grouped": grouped, "syncs": syncs}[args.check](torch.device(args.device))
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
