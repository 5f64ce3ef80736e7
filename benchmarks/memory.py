"""Memory per rank: what the memory model predicts beside what 4 gloo ranks of this machine measure.

    python benchmarks/memory.py             # writes benchmarks/results/memory.{md,json}
    python benchmarks/memory.py --smoke     # seconds: a tiny model on 2 ranks, for the test suite

Each layout runs on 4 processes (one thread each), builds its model the way `moeyard train` does (meta
device, sharded, each rank initialising its part) and trains a few steps on random tokens. Per rank:

- base: the resident set after torch, moeyard and the process group are loaded (what any process of
  this machine holds before a model exists; the memory model does not count it);
- build peak: the peak resident set while the model is built, minus base;
- model state: the bytes of this rank's parameters, gradients and optimizer state after the last step
  (the tensors themselves, FSDP's local shards);
- train peak: the peak resident set over the steps after the first (the optimizer state exists from
  then on), minus base;
- runtime: what the process holds after its first step that is no tensor -- library code paged in by the
  first GEMMs, the math libraries' own buffers, malloc's heaps, the Python heap (58-73 MB a rank here,
  about a tenth of a pipeline row; read as the resident set less base and every tensor alive, counted by
  storage from the garbage collector's objects, at the start of the second step);
- tensor peak: train peak less runtime: the tensors alone, what the memory model predicts and what a GPU's
  `max_memory_allocated` would count (no GPU has measured it). The tables compare it with the prediction.

The workers run glibc with a fixed 64 KiB mmap threshold and no trim threshold, so that a freed tensor's
pages go back to the system at once and the resident set follows the live tensors -- what a GPU's
`max_memory_allocated` reads and what the memory model predicts. (`moeyard train` does the opposite on
CPU, launch/malloc_policy.py: it keeps freed pages for speed, and its resident set then grows with the
allocator's fragmentation, +30-50% over the live peak on the calibration model here.)

The calibration model fits both ways (replicated and fsdp, each recompute mode); the large one is a
~1B-parameter MoE whose replicated state would not fit this machine's 24 GB at 4 ranks, trained with
fsdp. The slowest rank's median step time gives the fsdp/replicated ratio.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import socket
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per rank

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from moeyard import configs  # noqa: E402
from moeyard.parallel.stages import SPLIT_BACKWARD  # noqa: E402
from moeyard.trainer.config.sections import Config, read_config  # noqa: E402
from moeyard.trainer.memory_stats import local_bytes  # noqa: E402
from moeyard.trainer.scheduler.memory_fit import memory_layout  # noqa: E402
from moeyard.trainer.scheduler.memory_model import GB, count_parameters, predict_memory  # noqa: E402

OUT = Path(__file__).parent / "results" / "memory"
WORLD = 4

CALIBRATION = ["model.vocab_size=8192", "model.dim=512", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=4",
               "model.ffn_dim=2048", "model.max_seq_len=512", "model.moe.num_experts=8", "model.moe.ffn_dim=1024",
               "train.seq_len=512", "train.global_batch_tokens=4096", "parallel.ep=4"]
LARGE = ["model.vocab_size=8192", "model.dim=1024", "model.n_layers=11", "model.n_heads=16", "model.n_kv_heads=8",
         "model.ffn_dim=4096", "model.max_seq_len=128", "model.moe.num_experts=32", "model.moe.ffn_dim=1024",
         "train.seq_len=128", "train.global_batch_tokens=512", "parallel.ep=2", "parallel.fsdp=true"]
SMOKE = ["model.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.ffn_dim=128", "model.max_seq_len=64",
         "model.moe.num_experts=8", "model.moe.ffn_dim=64", "train.seq_len=64", "train.global_batch_tokens=1024",
         "parallel.ep=2"]
RECOMPUTES = ("none", "selective", "experts", "full")
LAYOUTS = [(fsdp, recompute) for fsdp in (False, True) for recompute in RECOMPUTES]
ACCUMULATING = [*CALIBRATION, "train.global_batch_tokens=8192", "train.micro_batch_size=1"]  # 4 micro-steps a rank
STATE_LAYOUTS = [[], ["parallel.fsdp=true"], ["parallel.fsdp=true", "parallel.fsdp_gather_once=true"],
                 ["parallel.fsdp=true", "parallel.fsdp_gather_once=true", "parallel.fsdp_reduce_once=false"],
                 ["parallel.fsdp=true", "parallel.fsdp_gather_once=true", "parallel.fsdp_reduce_once=false",
                  "optim.moment_dtype=bfloat16"],
                 ["parallel.fsdp=true", "parallel.ep=2", "model.moe.num_experts=2"]]
"""Where the state lives, on the accumulating calibration run: replicated, fsdp gathered every micro-step and
once per step, resident weights (gathered once, reduced every micro-step; then with bf16 AdamW moments),
and 2 experts over edp 2 (one expert per ep rank, its weights split on dim 1)."""
PIPELINE = [*CALIBRATION, "model.tie_embeddings=false"]
PP2 = ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"]
"""pp 2 x ep 2 on the 4 ranks, one sequence a micro-step: 4 micro-steps a step."""
PIPELINE_LAYOUTS = [[*PP2, "schedule.pipeline=1f1b"],
                    [*PP2, "schedule.pipeline=gpipe"],
                    [*PP2, "parallel.fsdp=true"],
                    [*PP2, "parallel.fsdp=true", "parallel.fsdp_gather_once=true"],
                    [*PP2, "schedule.pipeline=overlapped_1f1b"],
                    [*PP2, "schedule.pipeline=interleaved_1f1b", "parallel.fsdp=true"],
                    [*PP2, "schedule.pipeline=interleaved_1f1b", "parallel.fsdp=true",
                     "parallel.fsdp_gather_once=true"],
                    ["parallel.pp=4", "parallel.ep=1", "train.micro_batch_size=2"],
                    [*PP2, "parallel.fsdp=true", "parallel.fsdp_gather_once=true",
                     "parallel.fsdp_reduce_once=[false,true]"],
                    [*PP2, "schedule.pipeline=zbv_zero_bubble"],
                    [*PP2, "schedule.pipeline=dualpipev"],
                    [*PP2, "schedule.pipeline=dualpipev", "parallel.fsdp=true", "parallel.fsdp_gather_once=true"],
                    [*PP2, "schedule.pipeline=dualpipev", "parallel.layers_per_stage=[3,2,1,0]"],
                    [*PP2, "train.recompute=full"],
                    [*PP2, "schedule.pipeline=zbv_zero_bubble", "schedule.defer_weight_gradients=false"],
                    [*PP2, "schedule.pipeline=dualpipev", "schedule.defer_weight_gradients=false"],
                    [*PP2, "schedule.pipeline=dualpipev", "schedule.defer_weight_gradients=false",
                     "train.recompute=full"]]
"""Pipeline stages on the calibration model (4 micro-batches a step): 1f1b holds as many micro-batches'
activations on a stage as there are stages from it to the last, gpipe all of them; fsdp per micro-step and
gathered once per step (the stage's weights and unsharded gradients kept through the schedule); overlapped_1f1b
(one micro-batch more in flight, a forward beside each backward); interleaved_1f1b with 2 stages a rank under fsdp,
per micro-step and gathered once; pp 4; resident weights on the first rank and one reduction a step on the
last (parallel.fsdp_reduce_once per rank); the V-placed zbv_zero_bubble and dualpipev (replicated: its pairs in
two lanes; and under fsdp gathered once); dualpipev whose last stage holds no block (the first rank: three blocks,
the embedding, the output layer and the loss); then what the planner picks at scale: 1f1b under full recompute, the
V schedules with their weight gradients not deferred, and dualpipev so under full recompute (DeepSeek-V3's plan)."""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def live_tensor_bytes() -> int:
    """Bytes of every tensor alive in this process, each storage once (DTensors through their local shards)."""
    from torch.distributed.tensor import DTensor

    gc.collect()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated objects (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor)]
    for t in tensors:
        try:  # sparse tensors and storage-less wrappers have no storage to count
            storage = t.untyped_storage() if t.device.type != "meta" else None
        except (RuntimeError, NotImplementedError):
            continue
        if storage is not None and storage.data_ptr():
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def state_bytes(model: torch.nn.Module, sync) -> int:
    """This rank's parameters, gradients and optimizer state, counted from the tensors."""
    total = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    optimizer = sync.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        total += sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
    else:  # ShardedAdamW: a master shard and two moments per bucket
        total += sum(local_bytes(t) for s in optimizer.shards for t in (s.param, s.exp_avg, s.exp_avg_sq))
    return total


def _measure(rank: int, world: int, overrides: list[str], steps: int, port: int, results) -> None:
    import torch.distributed as dist

    from moeyard.trainer.loop import build_rank_model
    from moeyard.trainer.scheduler.run_planning import plan_for, run_mesh
    from moeyard.trainer.step import pipeline_for, train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = read_config(configs.path("tiny.yaml"), overrides)
    device = torch.device("cpu")
    pmesh = run_mesh(cfg, "cpu")
    plan = plan_for(cfg, pmesh, device)
    base = _status_kb("VmRSS")
    _reset_peak()
    model, sync = build_rank_model(cfg, pmesh, plan, device)
    pipeline = pipeline_for(model, pmesh, cfg, device) \
        if pmesh.pp > 1 else None
    build_peak = _status_kb("VmHWM") - base
    per_rank = cfg.global_batch_sequences // pmesh.dp
    torch.manual_seed(pmesh.dp_rank)  # the stages of one dp rank see the same rows
    times = []
    for step in range(steps):
        if step == min(1, steps - 1):
            runtime = _status_kb("VmRSS") - base - live_tensor_bytes()
            _reset_peak()
        batch = torch.randint(0, cfg.model.vocab_size, (per_rank, cfg.train.seq_len + 1))
        dist.barrier()
        start = time.perf_counter()
        train_step(model, sync, batch, micro_batch_size=cfg.train.micro_batch_size or per_rank, pmesh=pmesh,
                   lr=1e-4, grad_clip=1.0, dtype=torch.float32, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                   pipeline=pipeline)
        times.append(time.perf_counter() - start)
    train_peak = _status_kb("VmHWM") - base
    results.put({"rank": rank, "base": base, "build_peak": build_peak, "train_peak": train_peak,
                 "runtime": runtime, "tensor_peak": train_peak - runtime,
                 "state": state_bytes(model, sync), "times": times})
    dist.destroy_process_group()


def measure(overrides: list[str], steps: int, world: int) -> list[dict]:
    """Run one layout on `world` processes; their measurements in rank order."""
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # read by each worker's glibc
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_measure, args=(r, world, overrides, steps, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    got: list[dict] = []
    while len(got) < world:  # a rank killed (say, for memory) fails the layout instead of hanging it
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"ranks (rank, exit code) {dead} of {overrides} died") from None
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank of {overrides[-3:]} exited with {p.exitcode}")
    return sorted(got, key=lambda r: r["rank"])


def _label(cfg: Config, world: int) -> str:
    sync = "replicated"
    if cfg.parallel.fsdp:
        sync = "fsdp gathered once" if cfg.parallel.fsdp_gather_once else "fsdp"
        if cfg.parallel.fsdp_gather_once and cfg.parallel.fsdp_reduce_once is False:
            sync = "fsdp resident weights"
        elif cfg.parallel.fsdp_gather_once and isinstance(cfg.parallel.fsdp_reduce_once, list):
            once = [str(r) for r, o in enumerate(cfg.parallel.fsdp_reduce_once) if o]
            sync = f"fsdp resident weights, pp rank(s) {', '.join(once)} reducing once"
    dp = world // cfg.parallel.pp
    micro = cfg.global_batch_sequences // dp // (cfg.train.micro_batch_size or cfg.global_batch_sequences // dp)
    extra = f", {micro} micro-steps" if micro > 1 else ""
    if cfg.model.moe.num_experts // cfg.parallel.ep < dp // cfg.parallel.ep:
        extra += f", {cfg.model.moe.num_experts} experts over edp {dp // cfg.parallel.ep}"
    if cfg.parallel.pp > 1:
        stages = f" x {cfg.stages_per_rank} a rank" + (" in a V" if cfg.v_shape else "") \
            if cfg.stages_per_rank > 1 else ""
        sync = f"pp {cfg.parallel.pp}{stages} {cfg.schedule.pipeline}, {sync}"
        if cfg.parallel.layers_per_stage:
            extra += f", blocks per stage {cfg.parallel.layers_per_stage}"
    if cfg.optim.moment_dtype != "float32":
        extra += f", {cfg.optim.moment_dtype} moments"
    if cfg.parallel.pp > 1 and cfg.schedule.pipeline in SPLIT_BACKWARD and not cfg.defers_weight_gradients:
        extra += ", weight gradients not deferred"
    return f"{sync}, ep={cfg.parallel.ep}, recompute {cfg.train.recompute}{extra}"


def predictions(overrides: list[str], world: int = WORLD) -> dict:
    """What the memory model says of a row's layout (its fields of a row)."""
    cfg = read_config(configs.path("tiny.yaml"), overrides)
    predicted = predict_memory(cfg.model, memory_layout(cfg, world, 4))
    return {"predicted_peak": predicted.total,
            "predicted_state": predicted.parameters + predicted.gradients + predicted.optimizer,
            "predicted": {k: getattr(predicted, k) for k in
                          ("parameters", "gradients", "optimizer", "activations", "buffers")}}


def row(overrides: list[str], steps: int, world: int = WORLD) -> dict:
    cfg = read_config(configs.path("tiny.yaml"), overrides)
    counts = count_parameters(cfg.model, cfg.parallel.ep)
    ranks = measure(overrides, steps, world)
    slowest = [max(r["times"][i] for r in ranks) for i in range(steps)]
    out = {
        "layout": _label(cfg, world), "overrides": overrides, "params": counts.dense + counts.experts,
        **predictions(overrides, world),
        "ideal_state": 16 * (counts.dense + counts.experts) / world,
        "largest_block_bytes": 4 * counts.largest_block,
        "base": max(r["base"] for r in ranks), "build_peak": max(r["build_peak"] for r in ranks),
        "train_peak": max(r["train_peak"] for r in ranks), "state": max(r["state"] for r in ranks),
        "tensor_peak": max(r["tensor_peak"] for r in ranks), "runtime": max(r["runtime"] for r in ranks),
        "state_mean": statistics.mean(r["state"] for r in ranks),
        "step_s": statistics.median(slowest[1:] if steps > 1 else slowest),
    }
    print(f"{out['layout']}: predicted {out['predicted_peak'] / GB:.3f} GB, measured {out['tensor_peak'] / GB:.3f} "
          f"GB (resident {out['train_peak'] / GB:.3f}, base {out['base'] / GB:.2f}, "
          f"runtime {out['runtime'] / GB:.3f}), state {out['state'] / GB:.3f} GB, step {out['step_s']:.2f} s",
          flush=True)
    return out


def _peak_cells(r: dict) -> str:
    """A row's first cells: the layout, its predicted and measured (tensor) peak, their ratio, and the resident
    peak it was read from (tensors and runtime)."""
    return (f"| {r['layout']} | {r['predicted_peak'] / GB:.3f} GB | {r['tensor_peak'] / GB:.3f} GB | "
            f"{r['tensor_peak'] / r['predicted_peak']:.2f} | {r['train_peak'] / GB:.3f} GB |")


PEAK_HEADER = "| layout | predicted peak | measured tensor peak | measured / predicted | resident peak |"
PEAK_RULE = "|---|---|---|---|---|"


def state_markdown(rows: list[dict]) -> str:
    """Where the state lives with 4 micro-steps a step: peak against the model, the largest rank against the
    mean, and each layout's step time against replicated."""
    replicated = rows[0]
    lines = [f"{PEAK_HEADER} largest rank's state / mean | step | step / replicated |", f"{PEAK_RULE}---|---|---|"]
    for r in rows:
        lines.append(f"{_peak_cells(r)} {r['state'] / r['state_mean']:.3f} | {r['step_s']:.2f} s | "
                     f"{r['step_s'] / replicated['step_s']:.2f} |")
    return "\n".join(lines)


def pipeline_markdown(rows: list[dict]) -> str:
    """Pipeline layouts: the largest rank's peak against the model's largest stage."""
    lines = [f"{PEAK_HEADER} model state | step |", f"{PEAK_RULE}---|---|"]
    for r in rows:
        lines.append(f"{_peak_cells(r)} {r['state'] / GB:.3f} GB | {r['step_s']:.2f} s |")
    return "\n".join(lines)


def markdown(calibration: list[dict], large: dict | None) -> str:
    gb = 1 / GB
    lines = [f"{PEAK_HEADER} model state | build peak | step |", f"{PEAK_RULE}---|---|---|"]
    for r in calibration:
        lines.append(f"{_peak_cells(r)} {r['state'] * gb:.3f} GB | {r['build_peak'] * gb:.3f} GB | "
                     f"{r['step_s']:.2f} s |")
    replicated = {r["layout"].split("recompute ")[1]: r for r in calibration if r["layout"].startswith("replicated")}
    fsdp = {r["layout"].split("recompute ")[1]: r for r in calibration if r["layout"].startswith("fsdp")}
    ratios = ", ".join(f"{mode} {fsdp[mode]['step_s'] / replicated[mode]['step_s']:.2f}"
                       for mode in replicated if mode in fsdp)
    lines += ["", f"fsdp / replicated step time: {ratios}"]
    if large is not None:
        lines += ["", f"Large model, {large['params'] / 1e9:.2f}B parameters, {large['layout']}:",
                  f"- model state per rank {large['state'] * gb:.2f} GB measured, "
                  f"{large['ideal_state'] * gb:.2f} GB = 16 bytes x parameters / {WORLD} "
                  f"(ratio {large['state'] / large['ideal_state']:.3f});",
                  f"- peak {large['tensor_peak'] * gb:.2f} GB measured (resident {large['train_peak'] * gb:.2f} GB), "
                  f"{large['predicted_peak'] * gb:.2f} GB predicted (ratio "
                  f"{large['tensor_peak'] / large['predicted_peak']:.2f});",
                  f"- while building: {large['build_peak'] * gb:.2f} GB, against this rank's parameters "
                  f"({large['predicted']['parameters'] * gb:.2f} GB) plus one block "
                  f"({large['largest_block_bytes'] * gb:.2f} GB): ratio "
                  f"{large['build_peak'] / (large['predicted']['parameters'] + large['largest_block_bytes']):.2f};",
                  f"- step {large['step_s']:.1f} s (slowest rank, median)."]
    return "\n".join(lines)


def whole_table(calibration: list[dict], state: list[dict], large: dict | None) -> str:
    """memory.md's tables: the layouts, the large model, and where the state lives."""
    table = markdown(calibration, large)
    if state:
        table += "\n\nThe same model, 4 sequences a rank, one per micro-step:\n\n" + state_markdown(state)
    return table


def pipeline_table(stages: list[dict]) -> str:
    return "Pipeline stages, 4 micro-batches a step:\n\n" + pipeline_markdown(stages)


def repredict(out: Path) -> None:
    """The stored measurements against the memory model as it is now: every row's predicted fields recomputed,
    both tables written again (measured columns as they were, their first line kept, today's stamp added)."""
    whole = json.loads(out.with_suffix(".json").read_text())
    stages = json.loads(out.with_name("memory_pipeline.json").read_text())
    for r in [*whole["calibration"], *whole["state"], whole["large"], *stages]:
        r.update(predictions(r["overrides"]))
    stamp = f"; predictions recomputed {time.strftime('%Y-%m-%d')} (`python benchmarks/memory.py --repredict`)"
    for md, table in ((out.with_suffix(".md"), whole_table(whole["calibration"], whole["state"], whole["large"])),
                      (out.with_name("memory_pipeline.md"), pipeline_table(stages))):
        first = md.read_text().split("\n")[0].split("; predictions recomputed")[0]
        md.write_text(f"{first}{stamp}\n\n{table}\n")
        print(table, end="\n\n")
    out.with_suffix(".json").write_text(json.dumps(whole, indent=1))
    out.with_name("memory_pipeline.json").write_text(json.dumps(stages, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on 2 ranks, two layouts, 2 steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pipeline", action="store_true", help="only the pipeline-stage layouts")
    parser.add_argument("--repredict", action="store_true",
                        help="no run: the stored results' predicted columns from the memory model as it is now")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.repredict:
        repredict(args.out)
        return
    if args.pipeline:
        stages = [row([*PIPELINE, *layout], args.steps) for layout in PIPELINE_LAYOUTS]
        table = pipeline_table(stages)
        print(table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name("memory_pipeline.json").write_text(json.dumps(stages, indent=1))
        args.out.with_name("memory_pipeline.md").write_text(
            f"`python benchmarks/memory.py --pipeline`, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
        return
    if args.smoke:
        layouts, base, steps, large, world = LAYOUTS[::len(RECOMPUTES)], SMOKE, 2, None, 2
    else:
        layouts, base, steps, world = LAYOUTS, CALIBRATION, args.steps, WORLD
    calibration = [row([*base, f"parallel.fsdp={str(fsdp).lower()}", f"train.recompute={recompute}"], steps,
                       world) for fsdp, recompute in layouts]
    state = []
    if not args.smoke:
        state = [row([*ACCUMULATING, *layout], steps) for layout in STATE_LAYOUTS]
        large = row(LARGE, steps)
    table = whole_table(calibration, state, large)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"calibration": calibration, "state": state, "large": large},
                                                        indent=1))
    args.out.with_suffix(".md").write_text(f"`python benchmarks/memory.py`, {time.strftime('%Y-%m-%d')}\n\n{table}\n")


if __name__ == "__main__":
    main()
