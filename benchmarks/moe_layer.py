"""One MoE layer, forward + backward: moeyard vs DeepSpeed-MoE vs the matmul floor, in one run on CPU/gloo.

    python benchmarks/moe_layer.py                 # 2 and 4 ranks; 4k/16k tokens per rank; 8/32 experts
    python benchmarks/moe_layer.py --sweep         # 2 ranks; 1k..32k tokens; 8..64 experts; PNG plot
    python benchmarks/moe_layer.py --smoke         # seconds: tiny shapes, for the test suite

Each rank runs one thread. Same shapes, weights, inputs and routing (softmax top-2, renormalised) for
every system. Before timing, each configuration checks that moeyard (schedule off and planned) and
DeepSpeed (drop_tokens=False) compute the output and all gradients of an independent plain-torch
reference. Then it times each system (median of the slowest rank over repetitions, after warm-up):

- moeyard, schedule off (r=1) and planned (r picked by moeyard's own profiler and cost model);
- DeepSpeed-MoE `deepspeed.moe.layer.MoE` with capacity factor 1.25 and with drop_tokens=False;
- the floor: a plain loop of matmuls doing this rank's dropless expert work, forward and backward.

DeepSpeed is optional (`DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`); without it the
DeepSpeed columns are absent. Writes <out>.json (one entry per configuration and DeepSpeed mode, each
with speedup_vs_deepspeed and ratio_to_floor) and <out>.md; --sweep also writes <out>.png.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import asdict
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per rank

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from moeyard.launch.malloc_policy import keep_freed_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_cases import (  # noqa: E402
    Case,
    DeepSpeedLayer,
    MatmulFloor,
    MoeyardLayer,
    dropless_rows,
    init_deepspeed,
    make_inputs,
    make_weights,
    max_rel_error,
    reference_grads,
    time_interleaved,
)

HERE = Path(__file__).resolve().parent
CHECK_TOLERANCE = 1e-4
"""Largest error allowed against the reference, relative to each tensor's largest entry (float32)."""
DS_MODES = {"cf1.25": 1.25, "dropless": None}


def planned_chunks(case: Case, pmesh: Any) -> tuple[int, dict[int, float]]:
    """The pipeline degree moeyard's planner picks for this layer: its profiler on these shapes, then the
    cost model's fastest r for one layer's forward + backward; and the predicted ms of each r weighed."""
    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.trainer.scheduler.cost_model import moe_layer_timeline, workload_for
    from moeyard.trainer.scheduler.measured_costs import MeasuredCosts
    from moeyard.trainer.scheduler.planner import CHUNK_CHOICES, worth_leaving
    from moeyard.trainer.scheduler.profiler import measure

    world = dist.get_world_size()
    seq = min(case.tokens, 512)
    cfg = ModelConfig(vocab_size=256, dim=case.dim, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=case.ffn,
                      max_seq_len=seq, moe=MoEConfig(num_experts=case.experts, top_k=case.top_k, ffn_dim=case.ffn,
                                                     expert_compute="loop"))
    w = workload_for(cfg, tokens=case.tokens, seq_len=seq, ep=world, dp=world, micro_steps=1)
    costs = MeasuredCosts(measure(cfg, w, pmesh, torch.device("cpu"), torch.float32, repeats=3))
    choices = [r for r in CHUNK_CHOICES if r <= max(1, w.routed_rows // case.experts)]
    predicted = {r: 1e3 * moe_layer_timeline(w, costs, r).makespan for r in choices}
    fastest = min(choices, key=predicted.__getitem__)
    return (fastest if worth_leaving(predicted[1], predicted[fastest]) else 1), predicted


def run_case(case: Case, args: argparse.Namespace, pmesh: Any, with_ds: bool) -> dict[str, Any]:
    """Check, then time every system on one configuration (collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    W = make_weights(case)
    x, dy = make_inputs(case, rank)
    result: dict[str, Any] = {"world": world, **asdict(case)}

    want = reference_grads(case, W, x, dy)
    chunks, predicted = (1, {}) if args.sweep else planned_chunks(case, pmesh)
    result["planned_chunks"] = chunks
    result["predicted_ms_by_chunks"] = predicted
    systems: dict[str, Any] = {"moeyard_off": MoeyardLayer(case, W, 1)}
    if chunks > 1:
        systems["moeyard_planned"] = MoeyardLayer(case, W, chunks)
    if with_ds:
        for mode in args.ds_modes:
            systems[f"deepspeed_{mode}"] = DeepSpeedLayer(case, W, DS_MODES[mode])
    errors = {}
    for name, layer in systems.items():
        if name != "deepspeed_cf1.25":  # drops copies by design: not the same function
            errors[name] = max_rel_error(layer.step(x, dy), want)
    result["max_rel_error_vs_reference"] = errors
    bad = {k: v for k, v in errors.items() if not v <= CHECK_TOLERANCE}
    if bad:
        raise RuntimeError(f"{case}: these systems do not compute the reference layer (relative error > "
                           f"{CHECK_TOLERANCE}): {bad}; timing them would compare different work")

    rows = dropless_rows(case, W, x)
    floor = MatmulFloor(case, W, rows)
    busiest = torch.tensor([sum(rows)])
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    result["busiest_rank_rows"] = int(busiest)
    steps = {"floor": floor.step, **{name: partial(layer.step, x, dy) for name, layer in systems.items()}}
    for name, ms in time_interleaved(steps, args.warmup, args.reps).items():
        result[f"{name}_ms"] = ms
    if chunks == 1:
        result["moeyard_planned_ms"] = result["moeyard_off_ms"]  # the planner kept the plain path
    if rank == 0:
        print(f"[{world} ranks] {case.tokens} tokens, {case.experts} experts: " +
              ", ".join(f"{k} {v:.1f}" for k, v in result.items() if k.endswith("_ms")), flush=True)
    return result


def die_with_parent() -> None:
    """Linux: a rank outlives no killed benchmark (a stray rank would slow every later measurement)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker(rank: int, world: int, port: int, cases: list[Case], args: argparse.Namespace, out: str) -> None:
    die_with_parent()
    torch.set_num_threads(1)
    keep_freed_memory()  # as `moeyard train` does on CPU; the same process runs every system, so all gain
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout))
    with_ds = deepspeed_available() and not args.no_deepspeed
    if with_ds:
        init_deepspeed()
    from moeyard.parallel import build_mesh
    pmesh = build_mesh(world, "cpu")
    results = [run_case(case, args, pmesh, with_ds) for case in cases]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cases: list[Case], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn `world` ranks; a rank that fails or outlives --timeout fails the run with a message."""
    out = Path(args.out).with_suffix(f".w{world}.partial.json")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, cases, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if hung or failed:
        raise SystemExit(f"{world}-rank run failed: ranks {failed} exited non-zero"
                         + (f", ranks {hung} still running after {args.timeout} s" if hung else ""))
    results = json.loads(out.read_text())
    out.unlink()
    return results


def entries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration and DeepSpeed mode, with the ratios the targets are stated in."""
    rows = []
    for r in results:
        modes = [m for m in DS_MODES if f"deepspeed_{m}_ms" in r] or [None]
        for mode in modes:
            e = {k: r[k] for k in ("world", "tokens", "experts", "dim", "ffn", "top_k", "planned_chunks",
                                   "busiest_rank_rows", "floor_ms", "moeyard_off_ms", "moeyard_planned_ms", "predicted_ms_by_chunks",
                                   "max_rel_error_vs_reference")}
            e["ratio_to_floor"] = {"moeyard_off": r["moeyard_off_ms"] / r["floor_ms"],
                                   "moeyard_planned": r["moeyard_planned_ms"] / r["floor_ms"]}
            if mode is not None:
                ds = r[f"deepspeed_{mode}_ms"]
                e.update(deepspeed_mode=mode, deepspeed_ms=ds, speedup_vs_deepspeed=ds / r["moeyard_planned_ms"])
                e["ratio_to_floor"]["deepspeed"] = ds / r["floor_ms"]
            rows.append(e)
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "",
             "| ranks | tokens/rank | experts | DeepSpeed mode | floor | moeyard off | moeyard planned (r) | "
             "DeepSpeed | moeyard / floor | DeepSpeed / floor | speed-up vs DeepSpeed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        rf = e["ratio_to_floor"]
        ds = (f"{e['deepspeed_ms']:.1f} ms", f"{rf['deepspeed']:.2f}x", f"**{e['speedup_vs_deepspeed']:.2f}x**") \
            if "deepspeed_ms" in e else ("-", "-", "-")
        lines.append(f"| {e['world']} | {e['tokens']} | {e['experts']} | {e.get('deepspeed_mode', '-')} | "
                     f"{e['floor_ms']:.1f} ms | {e['moeyard_off_ms']:.1f} ms | {e['moeyard_planned_ms']:.1f} ms "
                     f"({e['planned_chunks']}) | {ds[0]} | {rf['moeyard_planned']:.2f}x | {ds[1]} | {ds[2]} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["experts"] for r in results})
    fig, axes = plt.subplots(1, len(experts), figsize=(5 * len(experts), 4), squeeze=False)
    for ax, E in zip(axes[0], experts):
        rs = sorted((r for r in results if r["experts"] == E), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rs]
        for key, label, style in (("floor_ms", "matmul floor", "k--"), ("moeyard_off_ms", "moeyard", "o-"),
                                  ("deepspeed_dropless_ms", "DeepSpeed drop_tokens=False", "s-"),
                                  ("deepspeed_cf1.25_ms", "DeepSpeed cf 1.25", "^-")):
            if all(key in r for r in rs):
                ax.plot(tokens, [r[key] for r in rs], style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="ms / iteration (fwd + bwd)",
               title=f"{E} experts, {rs[0]['world']} ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", help="rank counts (default 2 4; --sweep: 2)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank")
    parser.add_argument("--experts", type=int, nargs="+")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ds-modes", nargs="+", choices=list(DS_MODES), default=list(DS_MODES))
    parser.add_argument("--sweep", action="store_true", help="scaling sweep, schedule off only, with a plot")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, times nothing real")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each rank count")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/moe_layer[_sweep])")
    args = parser.parse_args()
    if args.smoke:
        args.world, args.tokens, args.experts, args.dim, args.ffn = args.world or [2], [256], [4], 32, 64
        args.warmup, args.reps = 1, 2
    elif args.sweep:
        args.world = args.world or [2]
        args.tokens = args.tokens or [1024, 2048, 4096, 8192, 16384, 32768]
        args.experts = args.experts or [8, 64]
    args.world = args.world or [2, 4]
    args.tokens = args.tokens or [4096, 16384]
    args.experts = args.experts or [8, 32]
    stem = Path(args.out or HERE / "results" / ("moe_layer_sweep" if args.sweep else "moe_layer"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    args.out = str(stem)
    for world in args.world:
        for E in args.experts:
            if E % world:
                raise SystemExit(f"--experts {E} is not divisible by --world {world}")

    results = []
    for world in args.world:
        cases = [Case(tokens=t, experts=e, dim=args.dim, ffn=args.ffn) for t in args.tokens for e in args.experts]
        results += run_world(world, cases, args)
    rows = entries(results)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"gloo, one thread per rank, {date.today().isoformat()}")
    title = f"MoE layer fwd+bwd, hidden {args.dim}, FFN {args.ffn}, top-2 ({machine})"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv),
                                                     "entries": rows, "raw": results}, indent=1))
    text = markdown(rows, title)
    if args.sweep:
        plot(results, stem.with_suffix(".png"))
        text += f"\n![ms per iteration against tokens]({stem.with_suffix('.png').name})\n"
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
