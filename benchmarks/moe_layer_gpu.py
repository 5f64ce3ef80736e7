"""One GPU, bf16: moeyard's MoE layer (grouped GEMM) vs Megatron-Core's MoELayer and DeepSpeed-MoE, and
the MFU of a ~1B-parameter MoE training step. Run through benchmarks/gpu.sh.

    python benchmarks/moe_layer_gpu.py                           # Mixtral-like layer, 16k tokens, H100
    python benchmarks/moe_layer_gpu.py --device cpu --smoke      # seconds, float32: checks the script

Reports, for forward + backward of one layer: ms, expert TFLOP/s (routed expert GEMM FLOPs only: 3
GEMMs of 2*rows*D*F forward, twice that backward) and that rate as a percentage of the dense bf16 GEMM
rate measured in the same run at the experts' own shape ([rows per expert, D] x [D, F]). Peers that are
not installed are reported as such, never silently dropped. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moeyard.models import GroupedExperts, MoE, MoEConfig

HERE = Path(__file__).resolve().parent
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peaks without sparsity (vendor data sheets), for MFU."""


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def dense_gemm_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, args) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    ms = timed_ms(lambda: a @ b, device, args.warmup, args.reps)
    return 2 * m * k * n / ms / 1e9


def expert_flops(rows: int, dim: int, ffn: int) -> float:
    return 3 * (3 * 2 * rows * dim * ffn)  # 3 GEMMs, forward + twice that backward


def moeyard_experts(args, dtype, device) -> Callable[[], None]:
    """The experts alone on a balanced split: the grouped GEMM path's own efficiency."""
    rows = args.tokens * args.top_k
    experts = GroupedExperts(args.experts, args.dim, args.ffn, "grouped_mm").to(device=device, dtype=dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(rows, args.dim, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(rows, args.dim, dtype=dtype, device=device)
    split = [rows // args.experts] * args.experts
    split[-1] += rows - sum(split)
    return lambda: experts(x, split).backward(dy)


def moeyard_layer(args, dtype, device) -> Callable[[], None]:
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, ffn_dim=args.ffn, expert_compute="grouped_mm",
                    recompute_experts=args.recompute)
    return fwd_bwd(MoE(args.dim, cfg), (1, args.tokens, args.dim), dtype, device)


def fwd_bwd(layer: torch.nn.Module, shape: tuple[int, ...], dtype, device) -> Callable[[], None]:
    """One forward + backward of a layer whose output is a tuple, on random input and output gradient."""
    layer = layer.to(device=device, dtype=dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    return lambda: layer(x)[0].backward(dy)


def deepspeed_layer(args, dtype, device) -> Callable[[], None]:
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    sys.path.insert(0, str(HERE))
    from layer_cases import SwiGLUExpert

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    layer = DeepSpeedMoE(args.dim, SwiGLUExpert(args.dim, args.ffn), num_experts=args.experts, ep_size=1,
                         k=args.top_k, capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                         top2_2nd_expert_sampling=False)
    return fwd_bwd(layer, (1, args.tokens, args.dim), dtype, device)


def megatron_layer(args, dtype, device) -> Callable[[], None]:
    """Megatron-Core's MoELayer at ep=1, grouped GEMM, all-to-all dispatcher, no token drop, no aux loss."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=args.dim, num_attention_heads=32, ffn_hidden_size=args.ffn,
                            moe_ffn_hidden_size=args.ffn, num_moe_experts=args.experts, moe_router_topk=args.top_k,
                            moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall", gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, bf16=dtype == torch.bfloat16,
                            params_dtype=dtype, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts, moe_grouped_gemm=True)
    return fwd_bwd(MoELayer(cfg, submodules=spec.submodules), (args.tokens, 1, args.dim), dtype, device)


def init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def layer_rows(args, dtype, device) -> list[dict[str, Any]]:
    rows_per_expert = args.tokens * args.top_k // args.experts
    dense = dense_gemm_tflops(rows_per_expert, args.dim, args.ffn, dtype, device, args)
    flops = expert_flops(args.tokens * args.top_k, args.dim, args.ffn)
    out = []
    systems = {"moeyard experts (grouped GEMM)": moeyard_experts, "moeyard MoE layer": moeyard_layer,
               "Megatron-Core MoELayer": megatron_layer, "DeepSpeed-MoE (drop_tokens=False)": deepspeed_layer}
    for name, build in systems.items():
        row: dict[str, Any] = {"system": name}
        try:
            step = build(args, dtype, device)
            ms = timed_ms(step, device, args.warmup, args.reps)
            tflops = flops / ms / 1e9
            row.update(ms=ms, expert_tflops=tflops, pct_of_dense_gemm=100 * tflops / dense)
        except Exception as err:  # a peer missing or failing is reported, the others still run
            row["unavailable"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        out.append(row)
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in out:
        row["dense_gemm_tflops"] = dense
    return out


def training_mfu(args, device) -> dict[str, Any]:
    """`moeyard train` on the ~1B config, one process; step time from its metrics, FLOPs from the config."""
    from moeyard.trainer.config.resolve import resolve_run
    from moeyard.trainer.scheduler.cost_model import block_fwd_flops

    overrides = list(args.mfu_set)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "moeyard", "train", str(args.mfu_config), "--nproc", "1",
               "--set", f"run.dir={tmp}/run", "--set", "log.tensorboard=false"]
        for o in overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mfu_timeout)
        if proc.returncode != 0:
            return {"unavailable": f"moeyard train failed: {proc.stderr[-1500:]}"}
        records = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    cfg = resolve_run(str(args.mfu_config), overrides)
    m, t = cfg.model, cfg.train
    tokens = t.global_batch_tokens
    fwd = sum(block_fwd_flops(m, tokens, t.seq_len, i) for i in range(m.n_layers)) + 2 * tokens * m.dim * m.vocab_size
    fwd += sum(2 * 3 * tokens * m.moe.top_k * m.dim * m.moe.ffn_dim for i in range(m.n_layers) if m.is_moe_layer(i))
    steady = [r["step_time_s"] for r in records[len(records) // 3:]]  # after compilation of kernels, warm caches
    step_s = sorted(steady)[len(steady) // 2]
    achieved = 3 * fwd / step_s / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {"config": str(args.mfu_config), "tokens_per_step": tokens, "step_s": step_s,
            "model_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None,
            "steps_timed": len(steady)}


def markdown(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [f"### One MoE layer, {a['dtype']}, {report['device']}, {report['date']}", "",
             f"hidden {a['dim']}, expert FFN {a['ffn']}, {a['experts']} experts, top-{a['top_k']}, "
             f"{a['tokens']} tokens; dense GEMM at the expert shape: {report['layers'][0]['dense_gemm_tflops']:.0f} "
             f"TFLOP/s", "", "| system | fwd+bwd | expert TFLOP/s | % of dense GEMM |", "|---|---|---|---|"]
    for r in report["layers"]:
        if "ms" in r:
            lines.append(f"| {r['system']} | {r['ms']:.2f} ms | {r['expert_tflops']:.1f} | "
                         f"{r['pct_of_dense_gemm']:.0f}% |")
        else:
            lines.append(f"| {r['system']} | {r['unavailable']} | | |")
    mfu = report.get("training")
    if mfu:
        lines += ["", "| training step | tokens/step | step time | model TFLOP/s | MFU |", "|---|---|---|---|---|"]
        if "step_s" in mfu:
            share = f"{100 * mfu['mfu']:.1f}%" if mfu["mfu"] else "peak unknown (--peak-tflops)"
            lines.append(f"| {mfu['config']} | {mfu['tokens_per_step']} | {mfu['step_s'] * 1e3:.0f} ms | "
                         f"{mfu['model_tflops']:.1f} | {share} |")
        else:
            lines.append(f"| {mfu['unavailable'][:200]} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="moeyard with recompute_experts")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--mfu-config", default=str(HERE.parent / "configs" / "moe-1b.yaml"))
    parser.add_argument("--mfu-set", nargs="*", default=[], help="overrides for the MFU run, k=v")
    parser.add_argument("--mfu-timeout", type=float, default=1200)
    parser.add_argument("--no-mfu", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (use with --device cpu)")
    parser.add_argument("--out", default=str(HERE / "results" / "moe_layer_gpu"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: this benchmark needs one (or --device cpu --smoke to check the script)")
    if args.smoke:
        args.tokens, args.dim, args.ffn, args.experts, args.warmup, args.reps = 256, 32, 64, 4, 1, 2
        args.mfu_set = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                        "model.ffn_dim=64", "model.moe.ffn_dim=32", "model.max_seq_len=64", "train.seq_len=64",
                        "train.global_batch_tokens=256", "train.micro_batch_size=null", "train.steps=3",
                        *args.mfu_set]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_single_process_group(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": date.today().isoformat(), "torch": torch.__version__,
        "args": {**vars(args), "dtype": str(dtype).replace("torch.", "")},
        "layers": layer_rows(args, dtype, device),
    }
    if not args.no_mfu:
        report["training"] = training_mfu(args, device)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
