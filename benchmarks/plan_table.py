"""The planner's table for published MoE shapes: memory per GPU and the fewest H100s / H200s each needs,
with FSDP (parallel.fsdp) and without any sharding beyond ep, the predicted TFLOP/s per GPU, and the
predictions held to the peers' own published runs.

    python benchmarks/plan_table.py            # writes benchmarks/results/plan_table.md
    python benchmarks/plan_table.py --stages   # the planner's pipeline stages: results/plan_stages.md
    python benchmarks/plan_table.py --calibration   # only its last section, the published runs, in place

Everything here is predicted (memory_model.py, cost_model.py with configs/hardware/*.yaml), nothing ran
on a GPU. Layout per model: micro-batch 1 x 4,096 tokens, bf16 compute with float32 master weights and
AdamW (16 bytes per parameter of model state), 4M-token global batch; ep (up to 64, dividing the experts)
and the world are chosen among powers of two (they split the batch's 1,024 sequences), to need the fewest
GPUs, with the config's recompute. The second table is the planner's choice at 64 GPUs (8 nodes; more
where the model needs them or a published run used them): the fastest of replicated, ZeRO, fsdp per
micro-step, fsdp gathered once and fsdp with resident weights (gathered once, reduced every micro-step),
each with every recompute mode (selective included), that fits on its largest rank
(`moeyard plan --hardware` makes the same choice). Every layout is a config that validates.
The third table predicts peers' published runs in their own layouts and batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moeyard import configs
from moeyard.trainer.config.sections import Config, read_config
from moeyard.trainer.scheduler.cost_model import Workload, model_flops, predict
from moeyard.trainer.scheduler.hardware import Hardware, HardwareCosts
from moeyard.trainer.scheduler.memory_fit import memory_layout
from moeyard.trainer.scheduler.memory_model import count_parameters, predict_memory, usable_gb
from moeyard.trainer.scheduler.planner import search
from moeyard.trainer.scheduler.run_planning import (
    LayoutChoice,
    choose_layout,
    configured_layout,
    dispatch_choices,
    layout_choices,
    load_hardware,
    workload,
)

MODELS = ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "mixtral-8x22b", "qwen3-235b-a22b", "gpt-oss-20b",
          "gpt-oss-120b", "glm-4.5-air", "glm-4.5", "deepseek-v3-671b", "kimi-k2"]
OUT = Path(__file__).parent / "results" / "plan_table.md"


WORLDS = [2**i for i in range(11)]
"""Powers of two up to 1,024: they split the 1,024 sequences of a 4M-token batch evenly."""


def published(name: str, *overrides: str) -> Config:
    """A published shape under layout overrides, validated like any config (ep must divide the experts)."""
    return read_config(configs.path(f"published/{name}.yaml"), list(overrides))


def expert_parallel_degrees(cfg: Config, world: int, cap: int = 64) -> list[int]:
    """Powers of two up to `cap` that divide the world and every MoE layer's experts."""
    counts = cfg.model.moe.num_experts_per_layer or [cfg.model.moe.num_experts]
    return [e for e in WORLDS if e <= min(cap, world) and world % e == 0 and all(n % e == 0 for n in counts)]


def fewest(name: str, hw, fsdp: bool) -> tuple[int, int] | None:
    """(world, ep) with the fewest GPUs that fit, over ep and world in powers of two (ep up to 64)."""
    best = None
    cfg = published(name)
    for ep in expert_parallel_degrees(cfg, max(WORLDS)):
        run = published(name, f"parallel.ep={ep}", f"parallel.fsdp={str(fsdp).lower()}")
        counts = count_parameters(run.model, ep)
        for world in (w for w in WORLDS if w >= ep):
            if predict_memory(run.model, memory_layout(run, world, hw.act_bytes), counts).fits(hw.memory_gb):
                if best is None or world < best[0]:
                    best = (world, ep)
                break
    return best


PUBLISHED_TFLOPS = {"mixtral-8x7b": "468 (Megatron-Core, bf16, H100, PP 4)",
                    "qwen3-235b-a22b": "245-276 (Megatron-Core, bf16, 256 H100, PP 8)"}
"""Model TFLOP/s per GPU that peers publish for the same shapes (../shared/REFERENCES.md)."""
SPEED_WORLD = {"qwen3-235b-a22b": 256, "glm-4.5": 128, "deepseek-v3-671b": 256, "kimi-k2": 512}
"""GPUs of the throughput row where a published run used another count, or where the model needs more
(default 64)."""


def fit_row(name: str, hw) -> str:
    """Fewest GPUs, with fsdp and without sharding beyond ep, and the memory per GPU there."""
    cfg = published(name)
    counts = count_parameters(cfg.model, 1)
    cells = [name, f"{(counts.dense + counts.experts) / 1e9:.1f}B"]
    for fsdp in (True, False):
        found = fewest(name, hw, fsdp)
        if found is None:
            cells += ["does not fit at any ep up to 64", "-"]
            continue
        world, ep = found
        run = published(name, f"parallel.ep={ep}", f"parallel.fsdp={str(fsdp).lower()}")
        gb = predict_memory(run.model, memory_layout(run, world, hw.act_bytes)).total / 1e9
        cells += [f"{world} (ep {ep})", f"{gb:.1f}"]
    return "| " + " | ".join(cells) + " |"


def planned(run: Config, world: int, hw: Hardware) -> tuple[LayoutChoice, Workload, HardwareCosts]:
    """The planner's choice for `run` on `world` GPUs of `hw` (as `moeyard plan --hardware`): the layout,
    its plan and prediction, and the workload."""
    w = workload(run, world // run.parallel.pp, hw.act_bytes, hw.devices_per_node)  # a stage's ranks split the batch
    costs = HardwareCosts(hw)
    choices = layout_choices(run, w, costs, usable_gb(hw.memory_gb))
    plan, best = choose_layout(choices)
    chosen = next(c for c in choices if c.plan is plan)
    return chosen, w, costs


def _layout_text(chosen, ep: int, world: int) -> str:
    return f"{world} (ep {ep}), {chosen.name}, recompute {chosen.recompute}"


def speed_row(name: str, hw, world: int = 64) -> str:
    """The planner's fastest layout that fits at `world` GPUs, ep as large as the experts allow (up to 64);
    model TFLOP/s per GPU (cost_model.model_flops: no recompute counted)."""
    ep = max(expert_parallel_degrees(published(name), world))
    chosen, w, costs = planned(published(name, f"parallel.ep={ep}"), world, hw)
    if not chosen.fits:
        return f"| {name} | does not fit on {world} | - | - | - | {PUBLISHED_TFLOPS.get(name, '-')} |"
    step = chosen.prediction
    shaped = dataclasses.replace(w, recompute=chosen.recompute)
    r1 = predict(shaped, dataclasses.replace(chosen.plan, chunks=(1,) * len(chosen.plan.chunks)), costs)
    return (f"| {name} | {_layout_text(chosen, ep, world)} | {chosen.memory_gb:.1f} | "
            f"{step.step:.2f} s ({r1.step:.2f} s at r=1) | {model_flops(shaped) / step.step / 1e12:.0f} | "
            f"{PUBLISHED_TFLOPS.get(name, '-')} |")


AUTOMODEL = ("NeMo AutoModel performance summary (DGX-H100, bf16, FSDP2 + EP, TE + DeepEP, balanced routing; "
             "NVIDIA-NeMo/Automodel docs/performance-summary.md, 2025-10-02, and its benchmark configs)")
MEGATRON = "Megatron-Core MoE (bf16, H100; ../shared/REFERENCES.md)"
BENCHMARK_GATE = ("model.moe.max_nodes_per_token=1", "schedule.dispatch=hierarchical")
"""NeMo AutoModel's benchmark runs route with `fake_balanced_gate` (its MoE layers: token t to experts
k*t .. k*t + k - 1, modulo the experts): every expert gets the same load, and a token's k copies lie on
consecutive experts, on one machine (DeepSeek-V3: 8 of the 32 experts a machine holds at EP 64; GPT-OSS-120B: 4
of 16), 2 GPUs. DeepEP sends each token across the network once per machine and fans it out inside: what
hierarchical dispatch with one machine a token predicts. Uniform routing would send DeepSeek-V3's tokens to
5.3 machines on average (3.6 with DeepSeek-V3's 4 of 8 groups, a machine's experts each at EP 64)."""
AUTOMODEL_PP = "NeMo AutoModel, DGX-H100 bf16 (as above)"


@dataclass(frozen=True)
class PublishedRun:
    """A peer's measured run: the model, its GPUs, its layout as moeyard overrides, and what it measured."""

    label: str
    model: str
    world: int
    overrides: tuple[str, ...]
    tokens_per_gpu_s: float | None
    tflops: float
    source: str
    needs: str = ""
    """What the peer's layout has that moeyard cannot express yet (empty: predicted in its own layout)."""
    gap: str = ""
    """Where prediction and measurement part, the term the model lacks or gets wrong (or the candidates)."""


PUBLISHED_RUNS = [
    PublishedRun("Qwen3-30B-A3B, 8 GPUs, EP 8, FSDP 8, 4 seq x 16 micro-steps, full recompute", "qwen3-30b-a3b", 8,
                 ("parallel.ep=8", "parallel.fsdp=true", "train.global_batch_tokens=2097152", "train.seq_len=4096",
                  "train.micro_batch_size=4", "train.recompute=full"), 12040, 277, AUTOMODEL,
                 gap="memory only: the loss's float32 logits, 8,192 tokens at a time over a 152k vocabulary "
                     "(15 GB; the peer keeps bf16 logits): with train.loss_chunk_tokens=2048 it fits"),
    PublishedRun("GPT-OSS-20B, 8 GPUs, EP 8, FSDP 8, 2 seq x 16 micro-steps, no recompute", "gpt-oss-20b", 8,
                 ("parallel.ep=8", "parallel.fsdp=true", "train.global_batch_tokens=1048576", "train.seq_len=4096",
                  "train.micro_batch_size=2", "train.recompute=none"), 13058, 279, AUTOMODEL,
                 gap="not identified; candidates: attention with sinks (the peer's FlexAttention) charged at "
                     "FlashAttention-3's rate, small GEMMs (dim 2880) at the large-GEMM rate; memory: float32 "
                     "logits over a 201k vocabulary, activations without recompute"),
    PublishedRun("GPT-OSS-120B, 64 GPUs, EP 64, FSDP 64, 2 seq x 4 micro-steps, no recompute", "gpt-oss-120b", 64,
                 ("parallel.ep=64", "parallel.fsdp=true", "train.global_batch_tokens=2097152", "train.seq_len=4096",
                  "train.micro_batch_size=2", "train.recompute=none", *BENCHMARK_GATE), 7626, 231, AUTOMODEL,
                 gap="not identified (0.97 with uniform routing and flat dispatch, before the benchmark gate was "
                     "modelled); candidates, as for GPT-OSS-20B, optimistic by more on one machine: attention with "
                     "sinks at FlashAttention-3's rate, GEMMs of dim 2880 at the large-GEMM rate; memory: float32 "
                     "logits over a 201k vocabulary, activations without recompute"),
    PublishedRun("Mixtral-8x7B, 64 GPUs, TP 1, PP 4, EP 8", "mixtral-8x7b", 64,
                 ("parallel.ep=8", "parallel.pp=4", "schedule.pipeline=1f1b", "train.micro_batch_size=1"), None, 468,
                 MEGATRON, gap="not identified (the peer's batch and recompute are not published; here the config's "
                               "4M tokens, micro-batch 1); Megatron's distributed optimizer shards the optimizer "
                               "state, which moeyard's stages keep replicated (memory only)"),
    PublishedRun("DeepSeek-V3-671B, 256 GPUs, PP 4, VPP 8, EP 64, FSDP 64, 8 micro-batches, full recompute",
                 "deepseek-v3-671b", 256,
                 ("parallel.ep=64", "parallel.pp=4", "parallel.fsdp=true", "parallel.fsdp_gather_once=true",
                  "schedule.pipeline=interleaved_1f1b", "schedule.stages_per_rank=8", "train.micro_batch_size=1",
                  "train.global_batch_tokens=2097152", "train.recompute=full", *BENCHMARK_GATE), 1002, 250,
                 AUTOMODEL_PP,
                 gap="memory only: the peer casts the model to bf16 (parameters, gradients and Adam's moments: 8 "
                     "bytes a parameter where moeyard keeps 16 with float32 master weights). What the prediction "
                     "rests on: the all-to-alls sent as DeepEP sends them, once per machine (hierarchical; flat: "
                     "0.68), the 8 virtual stages (1f1b: 0.79); uniform routing instead of the gate's: 0.94"),
]
"""Runs with a public layout and number on H100 in bf16 (their model and batch; what moeyard cannot
express is named). DeepSeek's own run (PP 16, DualPipe, FP8, H800) and Megatron-Core's Qwen3-235B
(TP 2, PP 8) are weighed against the planner's own choice of stages (STAGE_RUNS, `--stages`)."""


def calibration_row(run: PublishedRun, hw) -> str:
    """The peer's own layout predicted (its recompute, its batch); where that needs what moeyard lacks,
    moeyard's planned layout on the same GPUs, beside the published figures."""
    cfg = published(run.model, *run.overrides)
    costs = HardwareCosts(hw)
    w = workload(cfg, run.world // cfg.parallel.pp, hw.act_bytes, hw.devices_per_node)
    if run.needs:
        chosen, w, costs = planned(cfg, run.world, hw)
        step, recompute = chosen.prediction, chosen.recompute
        layout = f"moeyard's choice without it: {chosen.name}, recompute {recompute}, {chosen.memory_gb:.0f} GB"
    else:
        layout = configured_layout(cfg)
        plan, step = search(w, costs, cfg.grad_sync, dispatch_choices=dispatch_choices(cfg, w),
                            gather_once=layout.gather_once, reduce_once=layout.reduce_once)
        recompute = cfg.train.recompute
        memory = predict_memory(cfg.model, memory_layout(cfg, run.world, hw.act_bytes))
        over = "" if memory.fits(hw.memory_gb) else " (over)"
        layout = f"as published; memory model {memory.total / 1e9:.0f} GB{over}"
    shaped = dataclasses.replace(w, recompute=recompute)
    tokens_s = w.tokens * w.micro_steps / w.pp / step.step
    tflops = model_flops(shaped) / step.step / 1e12
    published_tokens = f"{run.tokens_per_gpu_s:,.0f}" if run.tokens_per_gpu_s else "-"
    ratio = f"{tokens_s / run.tokens_per_gpu_s:.2f}" if run.tokens_per_gpu_s else f"{tflops / run.tflops:.2f} (TFLOP/s)"
    return (f"| {run.label} | {layout} | {tokens_s:,.0f} | {published_tokens} | {tflops:.0f} | {run.tflops:g} | "
            f"{ratio} | {run.needs or run.gap or '-'} |")


STAGE_RUNS = [
    ("deepseek-v3-671b", 256, "DeepSeek-V3's own run: ~1,540 tokens/s per H800 (PP 16 DualPipe, EP 64, FP8 GEMMs, "
                              "2,048 GPUs; ../shared/REFERENCES.md); the issue's target: <= 14 s per 4M tokens "
                              "(1,170 tokens/s per GPU)", 1540.0, None),
    ("qwen3-235b-a22b", 256, "Megatron-Core: 245-276 TFLOP/s per H100 (TP 2, PP 8, VPP 4, EP 32, bf16)", None, 276.0),
]
"""The published pipeline runs, and what moeyard's planner chooses for the same model and GPUs with
schedule.mode=auto (pp, ep, schedule, micro-batch, layout, recompute: trainer/scheduler/stage_search.py)."""


def stages_section(hw_name: str = "dgx-h100") -> list[str]:
    """`moeyard plan --hardware` under schedule.mode=auto for the published pipeline runs: the stage layouts
    weighed (at one chunk per MoE layer), the chosen one's full plan, against the published figure."""
    from moeyard.trainer.scheduler.stage_search import best_planned, stage_choices, stages_table

    hw = load_hardware(hw_name)
    costs, capacity = HardwareCosts(hw), usable_gb(hw.memory_gb)
    lines = [f"## Pipeline stages chosen by the planner ({hw.name}, schedule.mode=auto; predicted, not run)", ""]
    for name, world, source, tokens, tflops in STAGE_RUNS:
        cfg = published(name, "schedule.mode=auto")
        choices = stage_choices(cfg, world, hw.devices_per_node, costs, capacity, hw.act_bytes)
        lines += [f"### {name} on {world} GPUs", "", "```", *stages_table(choices, capacity, shown=6), "```", ""]
        if not choices:
            lines += ["nothing fits", ""]
            continue
        best = best_planned(choices, world, hw.devices_per_node, costs, capacity, hw.act_bytes)
        run = best.cfg
        w = workload(run, world // run.parallel.pp, hw.act_bytes, hw.devices_per_node)
        chosen = choose_layout(layout_choices(run, w, costs, capacity))
        shaped = dataclasses.replace(w, recompute=chosen[0].recompute or run.train.recompute)
        step = chosen[1].step
        per_gpu = w.tokens * w.micro_steps / w.pp / step
        model_tflops = model_flops(shaped) / step / 1e12
        versus = f"{per_gpu / tokens:.2f} of its tokens/s per GPU" if tokens else \
            f"{model_tflops / tflops:.2f} of its TFLOP/s"
        lines += [f"chosen: {' '.join(best.changes)}; planned inside the stages: {chosen[0].summary()}", "",
                  f"step {step:.2f} s per {cfg.train.global_batch_tokens / 2**20:.0f}M tokens, {per_gpu:,.0f} tokens/s "
                  f"and {model_tflops:.0f} model TFLOP/s per GPU: {versus}. Published: {source}.", ""]
    return lines


def calibration_section() -> list[str]:
    """The published runs held to their predictions (the last section of plan_table.md)."""
    hw = load_hardware("dgx-h100")
    return ["## Held to published runs (dgx-h100)", "",
            "Predicted tokens/s per GPU against the measured, in the peer's layout, batch and routing (uniform, "
            "except NeMo AutoModel's benchmark gate over several machines: each token's copies on one machine, "
            "plan_table.BENCHMARK_GATE). TFLOP/s are each side's own formula (moeyard: cost_model.model_flops), so "
            "the tokens/s ratio is the comparison. Sources: " + "; ".join(sorted({r.source for r in PUBLISHED_RUNS}))
            + ".", "",
            "| published run | moeyard's layout | tokens/s/GPU predicted | published | TFLOP/s predicted | "
            "published | predicted / published | missing term, or the gap |", "|---|---|---|---|---|---|---|---|",
            *[calibration_row(run, hw) for run in PUBLISHED_RUNS], ""]


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
    lines += calibration_section()
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--calibration"]:  # the last section alone (minutes), in place in plan_table.md
        before, section = OUT.read_text().split("## Held to published runs")[0], calibration_section()
        OUT.write_text(before + "\n".join(section))
        print("\n".join(section))
    elif sys.argv[1:] == ["--stages"]:  # the pipeline section alone (minutes per model), to its own file
        text = "\n".join(["# Planner's pipeline stages for published runs (predicted, not run)", "",
                          *stages_section()])
        (OUT.parent / "plan_stages.md").write_text(text)
        print(text)
    else:
        main()
