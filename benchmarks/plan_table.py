"""The planner's table for published MoE shapes: memory per GPU and the fewest H100s / H200s each needs,
with FSDP (parallel.fsdp) and without any sharding beyond ep, and the predicted TFLOP/s per GPU.

    python benchmarks/plan_table.py            # writes benchmarks/results/plan_table.md

Everything here is predicted (memory_model.py, cost_model.py with configs/hardware/*.yaml), nothing ran
on a GPU. Layout per model: micro-batch 1 x 4,096 tokens, train.recompute=full, bf16 compute with float32
master weights and AdamW (16 bytes per parameter of model state), 4M-token global batch; ep is chosen
among the divisors of the expert count (up to 64) to need the fewest GPUs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moeyard import configs
from moeyard.parallel.scheduler.cost_model import model_flops, predict
from moeyard.parallel.scheduler.hardware import HardwareCosts
from moeyard.parallel.scheduler.memory_model import count_parameters, predict_memory, smallest_world
from moeyard.parallel.scheduler.planner import search
from moeyard.trainer.config import load_config
from moeyard.trainer.memory_plan import memory_layout
from moeyard.trainer.schedule import load_hardware, workload

MODELS = ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "mixtral-8x22b", "qwen3-235b-a22b"]
OUT = Path(__file__).parent / "results" / "plan_table.md"


def fewest(cfg, hw, fsdp: bool) -> tuple[int, int] | None:
    """(world, ep) with the fewest GPUs that fit, over ep in the divisors of the expert count up to 64."""
    best = None
    ep = 1
    while ep <= min(64, cfg.model.moe.num_experts):
        run = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep, fsdp=fsdp))
        layout = memory_layout(run, ep, hw.act_bytes)
        world = smallest_world(run.model, layout, hw.memory_gb, max_world=2048)
        if world is not None and (best is None or world < best[0]):
            best = (world, ep)
        ep *= 2
    return best


def row(name: str, hw) -> str:
    cfg = load_config(configs.path(f"published/{name}.yaml"))
    counts = count_parameters(cfg.model, 1)
    cells = [name, f"{(counts.dense + counts.experts) / 1e9:.1f}B"]
    for fsdp in (True, False):
        found = fewest(cfg, hw, fsdp)
        if found is None:
            cells += ["does not fit", "-"]
            continue
        world, ep = found
        run = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep, fsdp=fsdp))
        gb = predict_memory(run.model, memory_layout(run, world, hw.act_bytes)).total / 1e9
        cells += [f"{world} (ep {ep})", f"{gb:.1f}"]
        if fsdp:
            w = workload(run, world, hw.act_bytes)
            plan, best = search(w, HardwareCosts(hw), "fsdp")
            tflops = model_flops(w) / best.step / 1e12
            off = predict(w, dataclasses.replace(plan, chunks=(1,) * len(plan.chunks)), HardwareCosts(hw))
            fsdp_cells = [f"{tflops:.0f}", f"{best.step:.2f} s ({off.step:.2f} s at r=1)"]
    return "| " + " | ".join(cells + fsdp_cells) + " |"


def main() -> None:
    lines = ["# Planner's table: published MoE shapes (predicted, not run)", "",
             __doc__.strip().split("\n\n", 1)[1].split("\n\n", 1)[1], ""]
    for hw_name in ("dgx-h100", "dgx-h200"):
        hw = load_hardware(hw_name)
        lines += [f"## {hw.name}: {hw.memory_gb:g} GB per GPU", "",
                  "| model | params | fewest GPUs, fsdp | GB/GPU | fewest GPUs, replicated | GB/GPU | "
                  "TFLOP/s per GPU (fsdp) | step, 4M tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [row(name, hw) for name in MODELS]
        lines.append("")
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
