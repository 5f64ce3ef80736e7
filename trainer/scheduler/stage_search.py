"""schedule.mode=auto over pipeline stages, for a described cluster: which pp, and with it which ep, pipeline
schedule, micro-batch, layout and recompute, the run should take on `world` ranks.

Every pp that divides the world (each stage at least one block; with one stage a rank or in a V the last none
or more, where its own parameters train) is weighed with every ep that divides its stage's ranks and the
experts, 1f1b, overlapped_1f1b, interleaved_1f1b with two or four stages per rank and the two V-placed schedules
(zbv_zero_bubble, dualpipev; their split by stage_balance's local search), each layout parallel.pp runs
(run_planning.layouts_for) and the least recompute that fits the memory per rank, its blocks split over the
stages by the cost and memory models (stage_balance: parallel.layers_per_stage). Each is predicted at one chunk
per MoE layer, so that the search stays within minutes for a 671B model on 256 ranks; the chunk, bucket and
dispatch search then runs on the chosen one (run_planning.layout_choices). The
micro-batch: the configured one where the stages leave it enough micro-steps (at least pp), else the largest
that gives 4 x pp of them (a bubble of at most a quarter of the step), as Megatron-Core's guidance has it.

`moeyard plan --hardware` prints the search (report.hardware_report); a training run under schedule.mode=auto
with schedule.hardware takes its choice before any worker starts (choose_stages).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from moeyard.errors import ConfigError
from moeyard.parallel.plan import holds_reduction
from moeyard.parallel.stages import SPLIT_BACKWARD, V_SHAPED
from moeyard.trainer.config.node_layout import check_node_layout
from moeyard.trainer.config.sections import LOOPED, Config, accepted
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.scheduler.cost_model import Costs, predict
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.memory_fit import RECOMPUTE, memory_layout
from moeyard.trainer.scheduler.memory_model import count_parameters, predict_memory, usable_gb
from moeyard.trainer.scheduler.planner import reference_plan
from moeyard.trainer.scheduler.run_planning import (
    as_layout,
    choose_layout,
    configured_layout,
    dispatch_choices,
    layout_choices,
    layouts_for,
    load_hardware,
    resident_weights,
    workload,
)
from moeyard.trainer.scheduler.stage_balance import balance_stages

VIRTUAL_STAGES = (2, 4)
"""Stages per rank weighed for interleaved_1f1b (Megatron-Core's published Qwen3-235B run: VPP 4)."""


@dataclass(frozen=True)
class StageChoice:
    """One way to lay the run over the world, predicted at one chunk per MoE layer."""

    cfg: Config
    changes: tuple[str, ...]
    """What differs from the configured run, as --set overrides."""
    step_s: float
    memory_gb: float
    """Predicted peak of the largest rank."""

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pp


def ep_choices(cfg: Config, dp: int) -> list[int]:
    """The expert-parallel degrees a stage of `dp` ranks can take: divisors of dp and of every MoE layer's
    expert count, the configured one and the powers of two."""
    moe = cfg.model.moe
    counts = moe.num_experts_per_layer or [moe.num_experts]
    wanted = {cfg.parallel.ep, *(2 ** k for k in range(dp.bit_length()))}
    return sorted(e for e in wanted if e <= dp and dp % e == 0 and all(n % e == 0 for n in counts))


def micro_batch(cfg: Config, dp: int, pp: int) -> Optional[int]:
    """The micro-batch size (sequences) for pp stages of dp ranks; None: pp=1 as configured, or no size
    leaves pp micro-steps."""
    if pp == 1:
        return cfg.train.micro_batch_size
    per_rank = cfg.global_batch_sequences // dp
    sizes = [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and per_rank // m >= pp]
    if cfg.train.micro_batch_size in sizes:
        return cfg.train.micro_batch_size
    return next((m for m in sizes if per_rank // m >= 4 * pp), sizes[0] if sizes else None)


def _runs(cfg: Config, world: int, ranks_per_node: int) -> bool:
    """Whether moeyard runs this layout (its own checks)."""
    if not accepted(cfg, world):
        return False
    try:
        check_node_layout(cfg, world, ranks_per_node)
    except ConfigError:
        return False
    return True


def changes(before: Config, after: Config) -> tuple[str, ...]:
    """The --set overrides that turn `before` into `after` (sections parallel, schedule and train)."""
    out = []
    for section in ("parallel", "schedule", "train"):
        old, new = getattr(before, section), getattr(after, section)
        for field in dataclasses.fields(new):
            value: Any = getattr(new, field.name)
            if value != getattr(old, field.name):
                text = str(value).lower() if isinstance(value, bool) else "null" if value is None else \
                    f"[{','.join(str(v).lower() if isinstance(v, bool) else str(v) for v in value)}]" \
                    if isinstance(value, list) else value  # one shell word
                out.append(f"{section}.{field.name}={text}")
    return tuple(out)


def _candidates(cfg: Config, world: int, ranks_per_node: int) -> Iterator[Config]:
    """Every stage layout of the run that moeyard runs, layout and recompute still as configured."""
    for pp in range(1, min(world, cfg.model.n_layers) + 1):
        dp = world // pp
        if world % pp or cfg.global_batch_sequences % dp:
            continue
        micro = micro_batch(cfg, dp, pp)
        if pp > 1 and micro is None:
            continue
        defer, configured = cfg.schedule.defer_weight_gradients, cfg.schedule.stages_per_rank
        schedules = [(cfg.schedule.pipeline, configured, defer)] if pp == 1 else \
            [("1f1b", configured, defer), ("overlapped_1f1b", configured, defer)] + \
            [("interleaved_1f1b", v, defer) for v in VIRTUAL_STAGES] + \
            [(v_shaped, 2, deferred) for v_shaped in V_SHAPED for deferred in (True, False)]  # weight steps or not
        for ep in ep_choices(cfg, dp):
            for pipeline, per_rank, deferred in schedules:
                yield dataclasses.replace(  # the split is the balancer's (stage_balance), for each layout
                    cfg, parallel=dataclasses.replace(cfg.parallel, pp=pp, ep=ep, layers_per_stage=None),
                    schedule=dataclasses.replace(cfg.schedule, pipeline=pipeline, stages_per_rank=per_rank,
                                                 defer_weight_gradients=deferred),
                    train=dataclasses.replace(cfg.train, micro_batch_size=micro))


def _weight_steps_empty(run: Config) -> bool:
    """Weight gradients deferred where no rank's gradient sync can hold its reduction for them (fsdp reducing in
    every micro-step everywhere): the weight steps stay empty, the run is the one without deferring."""
    p = run.parallel
    return run.defers_weight_gradients and not any(
        holds_reduction(p.fsdp, p.fsdp_gather_once, p.reduce_once, r) for r in range(p.pp))


def stage_choices(cfg: Config, world: int, ranks_per_node: int, costs: Costs, capacity_gb: float,
                  act_bytes: int) -> list[StageChoice]:
    """The layouts that fit `capacity_gb` (usable GB per rank), fastest first."""
    frozen = frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen)
    counted: dict[int, Any] = {}
    choices = []
    for base in _candidates(cfg, world, ranks_per_node):
        pp, ep = base.parallel.pp, base.parallel.ep
        for layout in layouts_for(pp, base.schedule.pipeline):
            for recompute in RECOMPUTE:  # from keeping the most (fastest) to the least
                run = as_layout(base, layout, recompute)
                if not _runs(run, world, ranks_per_node) or (_weight_steps_empty(run) and not layout.gather_once):
                    break  # (fsdp per micro-step leaves the weight steps empty: weighed as the run without deferring)
                mem_layout = memory_layout(run, world, act_bytes)
                if pp == 1:
                    if ep not in counted:
                        counted[ep] = count_parameters(run.model, ep, frozen)
                    memory = predict_memory(run.model, mem_layout, counted[ep])
                    if memory.total > capacity_gb * 1e9:
                        continue
                w = workload(run, world // pp, act_bytes, ranks_per_node)
                reference = dataclasses.replace(reference_plan(w, layout.grad_sync), gather_once=layout.gather_once,
                                                reduce_once=layout.reduce_once)
                if pp > 1:  # the stages balanced for this layout: the split that fits with the fastest slowest rank
                    split = balance_stages(run, w, reference, costs, mem_layout, capacity_gb * 1e9)
                    if split is None:
                        continue
                    if split.reduce_once != layout.reduce_once:  # resident weights, some ranks reducing once
                        if all(split.reduce_once):  # all of them: fsdp gathered once, weighed on its own
                            break
                        run = as_layout(run, resident_weights(split.reduce_once), recompute)
                        reference = dataclasses.replace(reference, reduce_once=split.reduce_once)
                    run = dataclasses.replace(run, parallel=dataclasses.replace(
                        run.parallel, layers_per_stage=list(split.layers_per_stage)))
                    if _weight_steps_empty(run):  # the balancer's ranks all reduce every micro-step
                        break
                    mem_layout = memory_layout(run, world, act_bytes)
                    w = workload(run, world // pp, act_bytes, ranks_per_node)
                    memory = predict_memory(run.model, mem_layout)  # within the capacity: the split's
                step = min(predict(w, dataclasses.replace(reference, dispatch=() if d == "flat" else
                                                          (d,) * len(w.moe_layers)), costs).step
                           for d in dispatch_choices(run, w))
                choices.append(StageChoice(run, changes(cfg, run), step, memory.total / 1e9))
                break
    return sorted(choices, key=lambda c: c.step_s)


def stages_table(choices: list[StageChoice], capacity_gb: float, shown: int = 12) -> list[str]:
    """The fastest of the stage layouts weighed, and how many were."""
    lines = [f"pipeline stages weighed (schedule.mode=auto; {len(choices)} layouts fit {capacity_gb:.1f} GB usable "
             f"per rank; predicted at one chunk per MoE layer, fastest {min(shown, len(choices))} shown; -W: "
             f"weight gradients not deferred to the weight steps):",
             f"  {'pp':>3}{'ep':>5}{'schedule':>21}{'micro':>7}  {'layout':29}{'recompute':>10}{'step':>11}"
             f"{'memory':>10}"]
    for c in choices[:shown]:
        run = c.cfg
        layout = configured_layout(run).name
        schedule = run.schedule.pipeline if run.parallel.pp > 1 else "-"
        if run.parallel.pp > 1 and run.schedule.pipeline in LOOPED:
            schedule += f" x{run.schedule.stages_per_rank}"
        if run.parallel.pp > 1 and run.schedule.pipeline in SPLIT_BACKWARD and not run.defers_weight_gradients:
            schedule += " -W"  # schedule.defer_weight_gradients=false: the weight steps empty
        lines.append(f"  {run.parallel.pp:>3}{run.parallel.ep:>5}{schedule:>21}{run.train.micro_batch_size or '-':>7}"
                     f"  {layout:29}{run.train.recompute:>10}{c.step_s:>10.3f}s{c.memory_gb:>8.1f}GB")
    return lines


RERANKED = 3
"""The stage layouts fastest at one chunk per MoE layer that are planned in full (chunks, dispatch, layout)
before one is taken: at one chunk a schedule that hides the all-to-all by itself (dualpipev's lanes) is
favoured over one whose all-to-all the chunks would hide (Qwen3-235B: dualpipev 8.35 s against interleaved_1f1b
x 4's 8.74 s at one chunk, 8.04 s against 7.77 s planned)."""


def best_planned(choices: list[StageChoice], world: int, ranks_per_node: int, costs: Costs, capacity_gb: float,
                 act_bytes: int) -> StageChoice:
    """Of the RERANKED fastest `choices` (stage_choices' order), the one whose full plan is fastest."""
    def planned_s(choice: StageChoice) -> float:
        run = choice.cfg
        w = workload(run, world // run.parallel.pp, act_bytes, ranks_per_node)
        return choose_layout(layout_choices(run, w, costs, capacity_gb))[1].step

    return min(choices[:RERANKED], key=planned_s) if len(choices) > 1 else choices[0]


def chosen_for_training(cfg: Config) -> bool:
    """Whether choose_stages may take this layout `moeyard plan` weighs: not where a forward and a backward run
    in two lanes (overlapped_1f1b, dualpipev with replicated stages: Config.lanes), which have never run on a
    GPU, where they would also need CUDA streams of their own to overlap (README)."""
    return not cfg.lanes


def choose_stages(cfg: Config, world: int, ranks_per_node: int) -> tuple[Config, str]:
    """A training run under schedule.mode=auto with schedule.hardware: the fastest stage layout that fits the
    described machine on `world` ranks (what `moeyard plan --hardware` chooses), and the line that says so.
    Decided from the description alone, so every machine of the run decides alike. Where none fits, `cfg`
    as configured (the memory check then names what would)."""
    hw = load_hardware(cfg.schedule.hardware)
    capacity_gb = usable_gb(hw.memory_gb)
    choices = [c for c in stage_choices(cfg, world, ranks_per_node, HardwareCosts(hw), capacity_gb, hw.act_bytes)
               if chosen_for_training(c.cfg)]
    if not choices:
        return cfg, (f"schedule.mode=auto: no stage layout fits {hw.name} ({capacity_gb:.1f} GB usable per rank) on "
                     f"{world} ranks; the configured one is kept")
    best = best_planned(choices, world, ranks_per_node, HardwareCosts(hw), capacity_gb, hw.act_bytes)
    return best.cfg, (f"schedule.mode=auto chose the stages for {world} ranks of {hw.name}: "
                      f"{' '.join(best.changes) or 'the configured layout'} (of {len(choices)} that fit; "
                      f"{best.step_s:.3f} s per step predicted at one chunk per MoE layer, {best.memory_gb:.1f} GB "
                      f"per rank)")
