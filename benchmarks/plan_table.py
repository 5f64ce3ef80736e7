"""The planner's table for published MoE shapes: memory per GPU and the fewest H100s / H200s each needs,
with FSDP (parallel.fsdp) and without any sharding beyond ep, and the predicted TFLOP/s per GPU.

    python benchmarks/plan_table.py            # writes benchmarks/results/plan_table.md

Everything here is predicted (memory_model.py, cost_model.py with configs/hardware/*.yaml), nothing ran
on a GPU. Layout per model: micro-batch 1 x 4,096 tokens, train.recompute=full, bf16 compute with float32
master weights and AdamW (16 bytes per parameter of model state), 4M-token global batch; ep (up to 64)
and the world are chosen among powers of two (they split the batch's 1,024 sequences), to need the fewest GPUs. The
second table is the planner's step at 64 GPUs (8 nodes), where the FSDP gathers of a rank's many
micro-steps are spread over enough ranks to compare throughput with published runs.
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

MODELS = ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "mixtral-8x22b", "qwen3-235b-a22b"]
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


PUBLISHED_TFLOPS = {"mixtral-8x7b": "468 (Megatron-Core, bf16, H100)"}
"""Measured model TFLOP/s per GPU that peers publish for the same shapes (as cited in issue 18)."""


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
    """The planner's step at `world` GPUs with fsdp, ep as large as the experts allow (up to 64), the
    least recompute that fits; model TFLOP/s per GPU (6 x active parameters x tokens + attention)."""
    cfg = load_config(configs.path(f"published/{name}.yaml"))
    ep = min(world, cfg.model.moe.num_experts, 64)
    for recompute in ("none", "experts", "full"):
        run = with_layout(cfg, ep, True)
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, recompute=recompute))
        memory = predict_memory(run.model, memory_layout(run, world, hw.act_bytes))
        if memory.fits(hw.memory_gb):
            break
    w = workload(run, world, hw.act_bytes)
    plan, best = search(w, HardwareCosts(hw), "fsdp")
    off = predict(w, dataclasses.replace(plan, chunks=(1,) * len(plan.chunks)), HardwareCosts(hw))
    return (f"| {name} | {world} (ep {ep}), recompute {recompute} | {memory.total / 1e9:.1f} | "
            f"{best.step:.2f} s ({off.step:.2f} s at r=1) | {model_flops(w) / best.step / 1e12:.0f} | "
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
                  "|---|---|---|---|---|---|", *[speed_row(name, hw) for name in MODELS], ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
