"""What `moeyard plan` prints: the chosen plan, per-stage and per-step predictions, hidden communication."""
from __future__ import annotations

import dataclasses

import torch

from moeyard.parallel.plan import Plan
from moeyard.parallel.stages import stage_layers
from moeyard.trainer.config.node_layout import check_node_layout
from moeyard.trainer.config.sections import Config
from moeyard.trainer.precision import resolve_dtype
from moeyard.trainer.scheduler.cost_model import Costs, Workload, model_flops, predict
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.measured_costs import MeasuredCosts
from moeyard.trainer.scheduler.memory_fit import memory_report
from moeyard.trainer.scheduler.memory_model import usable_gb
from moeyard.trainer.scheduler.planner import reference_plan
from moeyard.trainer.scheduler.routing_bound import routing_bound_report
from moeyard.trainer.scheduler.run_planning import (
    LAYOUT_MARGIN,
    LayoutChoice,
    act_bytes,
    agreed_capacity_gb,
    as_layout,
    auto_plan,
    choose_layout,
    layout_choices,
    load_hardware,
    load_or_measure,
    planned_layout,
    profile_cache_dir,
    run_mesh,
    workload,
)
from moeyard.trainer.scheduler.stage_search import best_planned, changes, stage_choices, stages_table


def stage_split(w: Workload) -> str:
    """Which blocks each pipeline stage holds (the first also the embedding, the last the output layer)."""
    spans = stage_layers(w.n_layers - w.mtp_blocks, w.pp * w.stages_per_rank, w.layers_per_stage)
    mtp = f", the {w.mtp_blocks} MTP depth(s) on the last" if w.mtp_blocks else ""
    held = f"r and {2 * w.pp - 1} - r, in a V" if w.v_shape else f"r, r + {w.pp}, ..."
    looped = f" x {w.stages_per_rank} a rank (rank r holds stages {held})" if w.stages_per_rank > 1 else ""
    return (f"{w.pp} pipeline stages{looped} of {w.dp} ranks, decoder blocks per stage {[len(r) for r in spans]} "
            f"({', '.join(f'{r.start}-{r.stop - 1}' if r else 'none' for r in spans)}{mtp}); the work rows below "
            f"are the slowest stage's")


def layouts_table(cfg: Config, choices: list[LayoutChoice], capacity_gb: float, chosen: Plan) -> list[str]:
    """Every layout the planner weighed, its predicted step and memory, and which it took and why."""
    lines = [f"layouts weighed ({capacity_gb:.1f} GB usable per rank):",
             f"  {'layout':29}{'recompute':>10}{'step':>10}{'memory':>10}"]
    for c in choices:
        mark = " <- chosen" if c.layout.of(chosen) and c.plan.recompute == chosen.recompute else ""
        fits = "" if c.fits else " (does not fit; step at r=1)"
        lines.append(f"  {c.name:29}{c.recompute:>10}{c.prediction.step:>9.2f}s{c.memory_gb:>8.1f}GB{fits}{mark}")
    first = choices[0]
    if not (first.layout.of(chosen) and first.plan.recompute == chosen.recompute):
        why = "the configured layout does not fit" if not first.fits else \
            f"it is predicted faster than the configured layout by more than {LAYOUT_MARGIN:.0%}"
        lines.append(f"chosen: the fastest layout that fits ({why})" + (
            f"; train.recompute={chosen.recompute} instead of the configured {cfg.train.recompute}"
            if chosen.recompute else ""))
    return lines


def plan_report(cfg: Config, w: Workload, costs: Costs, source: str,
                capacity_gb: float = 0.0) -> tuple[Plan, str]:
    """`capacity_gb` (usable GB per rank; 0: unknown): the planner also weighs layouts by memory."""
    choices = layout_choices(cfg, w, costs, capacity_gb) if capacity_gb > 0 else []
    plan, best = choose_layout(choices) if choices else auto_plan(cfg, w, costs)
    planned = dataclasses.replace(w, recompute=plan.recompute) if plan.recompute else w
    # schedule off in the same layout: the speed-up is the schedule's, not the layout's
    off = predict(planned, dataclasses.replace(reference_plan(planned, plan.grad_sync), gather_once=plan.gather_once,
                                               reduce_once=plan.reduce_once), costs)
    ms = 1e3
    lines = [
        f"costs from {source}; world {w.dp * w.pp} ranks, ep={w.ep}, {w.tokens} tokens per rank per micro-step, "
        f"{w.micro_steps} micro-step(s)" + (f"; {stage_split(w)}" if w.pp > 1 else ""),
        *(layouts_table(cfg, choices, capacity_gb, plan) if choices else []),
        f"plan: {plan.summary()}",
        f"{'':24}{'plan':>12}{'schedule off':>14}",
    ]
    rows = [("step", best.step, off.step)]
    rows += [(f"  {k} (work)", best.stages.get(k, 0.0), off.stages.get(k, 0.0))
             for k in ("dense", "experts", "a2a", "param_gather", "grad_reduce", "optimizer")
             + (("pipeline_bubble",) if w.pp > 1 else ())]
    if w.overlapped:  # negative: what the lanes take off the step (cost_model._hidden_by_lanes)
        rows.append(("  all-to-alls in lanes", best.stages.get("lanes_hidden", 0.0), off.stages.get("lanes_hidden", 0.0)))
    rows += [("communication", best.comm, off.comm), ("  exposed", best.exposed_comm, off.exposed_comm)]
    for name, a, b in rows:
        lines.append(f"{name:24}{a * ms:>10.3f}ms{b * ms:>12.3f}ms")
    lines.append(f"communication hidden: {best.hidden_fraction:.0%} with the plan, {off.hidden_fraction:.0%} off; "
                 f"predicted speed-up {off.step / best.step:.3f}x")
    lines.append(f"model TFLOP/s per GPU: {model_flops(planned) / best.step / 1e12:.1f} (predicted; "
                 f"6 x active parameters x tokens + attention, no recompute counted)")
    lines.append(f"tokens/s per GPU: {w.tokens * w.micro_steps / w.pp / best.step:,.0f} (predicted)")
    return plan, "\n".join(lines)


def _as_planned(cfg: Config, plan: Plan) -> Config:
    """The config with the layout the plan chose (the planner may take another sharding and recompute)."""
    return as_layout(cfg, planned_layout(plan), plan.recompute or cfg.train.recompute)


def measured_report(cfg: Config, device: torch.device) -> str:
    """Profile this machine on the real process groups (cached) and report the plan. Collective."""
    pmesh = run_mesh(cfg, device.type)
    w = workload(cfg, pmesh.dp, act_bytes(cfg, device), pmesh.ranks_per_node)
    profile, cached = load_or_measure(cfg.model, w, pmesh, device, resolve_dtype(cfg.train.dtype, device),
                                      profile_cache_dir())
    source = f"a profile of this machine ({'cached' if cached else 'measured now'}, key {profile.key})"
    costs = MeasuredCosts(profile)
    plan, report = plan_report(cfg, w, costs, source, agreed_capacity_gb(device))
    return "\n".join([report, routing_bound_report(cfg, w, costs),
                      memory_report(_as_planned(cfg, plan), pmesh.dp * pmesh.pp, w.act_bytes)])


def hardware_report(cfg: Config, world_size: int, hardware_path: str) -> str:
    """Plan for a described machine: no processes, no measurement."""
    hw = load_hardware(hardware_path)
    ranks_per_node = cfg.parallel.ranks_per_node or min(hw.devices_per_node, world_size)
    costs, capacity_gb = HardwareCosts(hw), usable_gb(hw.memory_gb)
    configured, stages = cfg, []
    if cfg.schedule.mode == "auto":  # the planner also chooses the pipeline stages (and ep with them)
        choices = stage_choices(cfg, world_size, ranks_per_node, costs, capacity_gb, hw.act_bytes)
        stages = stages_table(choices, capacity_gb)
        cfg = best_planned(choices, world_size, ranks_per_node, costs, capacity_gb, hw.act_bytes).cfg if choices \
            else cfg
    check_node_layout(cfg, world_size, ranks_per_node)
    w = workload(cfg, world_size // cfg.parallel.pp, hw.act_bytes, ranks_per_node)
    plan, report = plan_report(cfg, w, costs, f"the hardware description {hw.name} ({hardware_path})",
                               capacity_gb)
    planned = _as_planned(cfg, plan)
    if stages:  # what the stage table chose, with the layout and recompute the plan below settled on
        stages.append(f"chosen: {' '.join(changes(configured, planned)) or 'the configured run'}" + (
            f" (a training run with these overrides plans inside its stages under schedule.mode=auto: as below "
            f"with --set schedule.hardware={hardware_path}, from its own measurements without)"
            if planned.parallel.pp > 1 else ""))
    return "\n".join([*stages, report, routing_bound_report(cfg, w, costs),
                      memory_report(planned, world_size, hw.act_bytes, hw.memory_gb, hw.name)])
