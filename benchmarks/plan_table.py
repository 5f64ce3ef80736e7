"""The planner's table for published MoE shapes: memory per GPU and the fewest H100s / H200s each needs,
with FSDP (parallel.fsdp) and without any sharding beyond ep, and the predicted TFLOP/s per GPU.

    python benchmarks/plan_table.py            # writes benchmarks/results/plan_table.md

Everything here is predicted (memory_model.py, cost_model.py with configs/hardware/*.yaml), nothing ran
on a GPU. Layout per model: micro-batch 1 x 4,096 tokens, train.recompute=full, bf16 compute with float32
master weights and AdamW (16 bytes per parameter of model state), 4M-token global batch; ep (up to 64)
and the world are chosen among powers of two (they split the batch's 1,024 sequences), to need the fewest GPUs. The
second table is the planner's fastest layout that fits at 64 GPUs (8 nodes; 256 for Qwen3-235B, as the
published run), ZeRO or fsdp, to compare throughput with published runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moeyard import configs
from moeyard.parallel.scheduler.cost_model import model_flops, predict
from moeyard.parallel.scheduler.hardware import HardwareCosts
from moeyard.parallel.scheduler.memory_model import count_parameters, predict_memory
from moeyard.parallel.scheduler.planner import search
from moeyard.trainer.config import load_config
from moeyard.trainer.memory_plan import memory_layout
from moeyard.trainer.schedule import load_hardware, workload

MODELS = ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "mixtral-8x22b", "qwen3-235b-a22b", "gpt-oss-20b",
          "gpt-oss-120b", "glm-4.5-air", "glm-4.5", "deepseek-v3-671b", "kimi-k2"]
OUT = Path(__file__).parent / "results" / "plan_table.md"


WORLDS = [2**i for i in range(11)]
"""Powers of two up to 1,024: they split the 1,024 sequences of a 4M-token batch evenly."""


def with_layout(cfg, ep: int, fsdp: bool):
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep, fsdp=fsdp))


def fewest(cfg, hw, fsdp: bool) -> tuple[int, int] | None:
    """(world, ep) with the fewest GPUs that fit, over ep and world in powers of two (ep up to 64)."""
    best = None
    for ep in (e for e in WORLDS if e <= min(64, cfg.model.moe.num_experts)):
        run = with_layout(cfg, ep, fsdp)
        counts = count_parameters(run.model, ep)
        for world in (w for w in WORLDS if w >= ep):
            if predict_memory(run.model, memory_layout(run, world, hw.act_bytes), counts).fits(hw.memory_gb):
                if best is None or world < best[0]:
                    best = (world, ep)
                break
    return best


PUBLISHED_TFLOPS = {"mixtral-8x7b": "468 (Megatron-Core, bf16, H100)",
                    "qwen3-235b-a22b": "245-276 (Megatron-Core, bf16, 256 H100)"}
"""Model TFLOP/s per GPU that peers publish for the same shapes (../shared/REFERENCES.md)."""
SPEED_WORLD = {"qwen3-235b-a22b": 256, "glm-4.5": 128, "deepseek-v3-671b": 256, "kimi-k2": 512}
"""GPUs of the throughput row where a published run used another count, or where the model needs more
(default 64)."""


def fit_row(name: str, hw) -> str:
    """Fewest GPUs, with fsdp and without sharding beyond ep, and the memory per GPU there."""
    cfg = load_config(configs.path(f"published/{name}.yaml"))
    counts = count_parameters(cfg.model, 1)
    cells = [name, f"{(counts.dense + counts.experts) / 1e9:.1f}B"]
    for fsdp in (True, False):
        found = fewest(cfg, hw, fsdp)
        if found is None:
            cells += ["does not fit at any ep up to 64", "-"]
            continue
        world, ep = found
        run = with_layout(cfg, ep, fsdp)
        gb = predict_memory(run.model, memory_layout(run, world, hw.act_bytes)).total / 1e9
        cells += [f"{world} (ep {ep})", f"{gb:.1f}"]
    return "| " + " | ".join(cells) + " |"


def speed_row(name: str, hw, world: int = 64) -> str:
    """The planner's fastest layout that fits at `world` GPUs: ep as large as the experts allow (up to 64),
    ZeRO-sharded optimizer state (schedule.grad_sync=reduce_scatter) or fsdp, the least recompute that
    fits each; model TFLOP/s per GPU (6 x active parameters x tokens + attention, no recompute)."""
    cfg = load_config(configs.path(f"published/{name}.yaml"))
    ep = min(world, cfg.model.moe.num_experts, 64)
    best = None
    for fsdp in (False, True):
        for recompute in ("none", "experts", "full"):
            run = with_layout(cfg, ep, fsdp)
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, recompute=recompute),
                                      schedule=dataclasses.replace(run.schedule, grad_sync="all_reduce" if fsdp
                                                                   else "reduce_scatter"))
            memory = predict_memory(run.model, memory_layout(run, world, hw.act_bytes))
            if not memory.fits(hw.memory_gb):
                continue
            w = workload(run, world, hw.act_bytes)
            plan, step = search(w, HardwareCosts(hw), "fsdp" if fsdp else "reduce_scatter")
            if best is None or step.step < best[3].step:
                best = (run, memory, w, step, plan)
            break
    if best is None:
        return f"| {name} | does not fit on {world} | - | - | - | {PUBLISHED_TFLOPS.get(name, '-')} |"
    run, memory, w, step, plan = best
    off = predict(w, dataclasses.replace(plan, chunks=(1,) * len(plan.chunks)), HardwareCosts(hw))
    sync = "fsdp" if run.parallel.fsdp else "ZeRO"
    return (f"| {name} | {world} (ep {ep}), {sync}, recompute {run.train.recompute} | {memory.total / 1e9:.1f} | "
            f"{step.step:.2f} s ({off.step:.2f} s at r=1) | {model_flops(w) / step.step / 1e12:.0f} | "
            f"{PUBLISHED_TFLOPS.get(name, '-')} |")


def main() -> None:
    lines = ["# Planner's table: published MoE shapes (predicted, not run)", "",
             __doc__.strip().split("\n\n", 1)[1].split("\n\n", 1)[1], ""]
    for hw_name in ("dgx-h100", "dgx-h200"):
        hw = load_hardware(hw_name)
        lines += [f"## {hw.name}: {hw.memory_gb:g} GB per GPU", "",
                  "| model | params | fewest GPUs, fsdp | GB/GPU | fewest GPUs, replicated | GB/GPU |",
                  "|---|---|---|---|---|---|", *[fit_row(name, hw) for name in MODELS], "",
                  "| model | layout | GB/GPU | step, 4M tokens | TFLOP/s per GPU, predicted | published |",
                  "|---|---|---|---|---|---|", *[speed_row(name, hw, SPEED_WORLD.get(name, 64)) for name in MODELS],
                  ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
