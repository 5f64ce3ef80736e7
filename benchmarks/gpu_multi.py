"""The device check's multi-GPU steps (benchmarks/gpu_check.sh --gpus N): N processes, one GPU each, NCCL;
with --device cpu, gloo ranks on the CPU (how the suite smoke-tests them until a multi-GPU machine is lent).

    python benchmarks/gpu_multi.py exchange --nproc 2   # NCCL all-to-all: flat r=1, r=2 and hierarchical
                                                        # dispatch against the one-device layer
    python benchmarks/gpu_multi.py fsdp --nproc 2       # peak memory per rank: replicated vs FSDP2 state
    python benchmarks/gpu_multi.py overlap --nproc 2    # the pipelined exchange (r = 2, 4) against r = 1
    add --device cpu --smoke for tiny shapes on gloo

exchange: every rank's output and gradients (input, router, its experts) against an independent plain-torch
layer holding every expert (benchmarks/layer_cases.py), float32 with the expert loop (exact up to sum
order) and bf16 with the grouped GEMM (bf16 rounding); hierarchical dispatch treats each half of the ranks
as one machine. fsdp: one training step of a small MoE model (AdamW), replicated state vs FSDP2-sharded,
the largest rank's peak. overlap: fwd+bwd ms of one layer per pipeline degree, median of the slowest rank.
Rank 0 prints one JSON line; the exit status is non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_cases import (  # noqa: E402
    Case,
    MoeyardLayer,
    Weights,
    make_inputs,
    make_weights,
    max_rel_error,
    reference_grads,
    time_interleaved,
    weights_on,
)


def _layer(device: torch.device, smoke: bool, tokens: int, dim: int) -> tuple[Case, Weights, Tensor, Tensor]:
    """One layer's case (4 experts a rank, FFN 2 x dim), its weights and this rank's inputs, on `device`."""
    world = dist.get_world_size()
    case = Case(tokens=256 if smoke else tokens, experts=4 * world, dim=64 if smoke else dim,
                ffn=128 if smoke else 2 * dim)
    x, dy = (t.to(device) for t in make_inputs(case, dist.get_rank()))
    return case, weights_on(make_weights(case), device), x, dy


def _exchange(device: torch.device, smoke: bool) -> dict:
    from moeyard.parallel import ExpertParallelExchange, build_mesh
    from moeyard.parallel.exchange.hierarchical import NodeGroups

    world = dist.get_world_size()
    case, W, x, dy = _layer(device, smoke, tokens=8192, dim=1024)
    want = reference_grads(case, W, x, dy)
    pmesh = build_mesh(world, device.type, ranks_per_node=max(1, world // 2))
    nodes = NodeGroups(pmesh.node_group, pmesh.cross_group)
    errors = {}
    for name, chunks, dispatch in (("flat r=1", 1, "flat"), ("flat r=2", 2, "flat"),
                                   ("hierarchical r=1", 1, "hierarchical"), ("hierarchical r=2", 2, "hierarchical")):
        exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks, dispatch, nodes)
        errors[name] = max_rel_error(MoeyardLayer(case, W, chunks, exchange).step(x, dy), want)
    bf16 = {}
    if device.type == "cuda":  # the GPU's own path: bf16 rows, the grouped GEMM
        for name, dispatch in (("flat r=2 bf16", "flat"), ("hierarchical r=2 bf16", "hierarchical")):
            exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, 2, dispatch, nodes)
            layer = MoeyardLayer(case, W, 2, exchange, compute="auto")  # grouped GEMM where its kernel runs
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = layer.step(x, dy)
            bf16[name] = max_rel_error({k: v.float() for k, v in got.items()}, want)
    return {"case": vars(case), "max_rel_error_float32": errors, "max_rel_error_bf16": bf16,
            "ok": all(e < 1e-4 for e in errors.values()) and all(e < 5e-2 for e in bf16.values())}


def _fsdp(device: torch.device, smoke: bool) -> dict:
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, build_mesh
    from moeyard.parallel.fsdp import apply_fsdp, mixed_precision
    from moeyard.trainer.memory_stats import peak_bytes

    world = dist.get_world_size()
    dim, layers = (64, 2) if smoke else (2048, 8)
    cfg = ModelConfig(vocab_size=1024 if smoke else 32000, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=8,
                      ffn_dim=4 * dim, max_seq_len=256 if smoke else 2048,
                      moe=MoEConfig(num_experts=4 * world, top_k=2, ffn_dim=dim, first_dense_layers=0))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1), device=device)
    peaks = {}
    for fsdp in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg).to(device)
        pmesh = build_mesh(world, device.type)
        apply_expert_parallel(model, pmesh)
        if fsdp:
            apply_fsdp(model, pmesh, policy=mixed_precision(dtype, torch.float32))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        peak_bytes(device)  # reset the peak
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits_BTV.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        peak = torch.tensor([float(peak_bytes(device))], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peaks["fsdp" if fsdp else "replicated"] = float(peak) / 1e9
        del model, optimizer, out, loss
    return {"peak_gb_largest_rank": peaks, "fsdp_over_replicated": peaks["fsdp"] / peaks["replicated"],
            # On CPU the peak is the process's resident high-water mark, which never falls: not comparable.
            "ok": device.type != "cuda" or peaks["fsdp"] < peaks["replicated"]}


def _overlap(device: torch.device, smoke: bool) -> dict:
    case, W, x, dy = _layer(device, smoke, tokens=16384, dim=2048)
    compute = "grouped_mm" if device.type == "cuda" else "loop"
    layers = {r: MoeyardLayer(case, W, r, compute=compute) for r in (1, 2, 4)}

    def step(layer: MoeyardLayer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            layer.step(x, dy)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ms = time_interleaved({f"r={r}": partial(step, layer) for r, layer in layers.items()}, 1 if smoke else 3,
                          2 if smoke else 10)
    # A measurement: it fails only if a degree does not run (the exchange's results are step 7's check).
    return {"case": vars(case), "ms": ms, "speedup_vs_r1": {k: ms["r=1"] / v for k, v in ms.items()}, "ok": True}


CHECKS = {"exchange": _exchange, "fsdp": _fsdp, "overlap": _overlap}


def _worker(rank: int, world: int, port: int, check: str, device_type: str, smoke: bool, out: str) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # forked ranks share the cores: one thread each, as the suite's ranks
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result = CHECKS[check](device, smoke)
        if rank == 0:
            Path(out).write_text(json.dumps({"check": check, "ranks": world, "device": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)"), **result}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=list(CHECKS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(os.environ.get("WORK", "/tmp")) / f"gpu_multi_{args.check}_{os.getpid()}.json"
    # CUDA needs fresh interpreters; CPU ranks fork from this one, which has torch imported already.
    mp.start_processes(_worker, args=(args.nproc, port, args.check, args.device, args.smoke, str(out)),
                       nprocs=args.nproc, start_method="spawn" if args.device == "cuda" else "fork")
    result = json.loads(out.read_text())
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
