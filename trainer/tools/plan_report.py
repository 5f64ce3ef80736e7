"""What `moeyard plan` prints: the chosen plan, per-stage and per-step predictions, hidden communication."""
from __future__ import annotations

import dataclasses

import torch

from moeyard.parallel import build_mesh
from moeyard.parallel.scheduler.cost_model import Costs, Workload, predict
from moeyard.parallel.scheduler.hardware import HardwareCosts
from moeyard.parallel.scheduler.plan import Plan
from moeyard.parallel.scheduler.planner import reference_plan
from moeyard.parallel.scheduler.profile import MeasuredCosts
from moeyard.trainer.config import Config
from moeyard.trainer.memory_plan import memory_report
from moeyard.trainer.node_layout import check_node_layout
from moeyard.trainer.precision import resolve_dtype
from moeyard.trainer.schedule import (
    act_bytes,
    auto_plan,
    load_hardware,
    load_or_measure,
    profile_cache_dir,
    workload,
)
from moeyard.trainer.tools.routing_bound import routing_bound_report


def plan_report(cfg: Config, w: Workload, costs: Costs, source: str) -> tuple[Plan, str]:
    plan, best = auto_plan(cfg, w, costs)
    off = predict(w, reference_plan(w, cfg.grad_sync), costs)
    ms = 1e3
    lines = [
        f"costs from {source}; world {w.dp} ranks, ep={w.ep}, {w.tokens} tokens per rank per micro-step, "
        f"{w.micro_steps} micro-step(s)",
        f"plan: {plan.summary()}",
        f"{'':24}{'plan':>12}{'schedule off':>14}",
    ]
    rows = [("step", best.step, off.step)]
    rows += [(f"  {k} (work)", best.stages.get(k, 0.0), off.stages.get(k, 0.0))
             for k in ("dense", "experts", "a2a", "param_gather", "grad_reduce", "optimizer")]
    rows += [("communication", best.comm, off.comm), ("  exposed", best.exposed_comm, off.exposed_comm)]
    for name, a, b in rows:
        lines.append(f"{name:24}{a * ms:>10.3f}ms{b * ms:>12.3f}ms")
    lines.append(f"communication hidden: {best.hidden_fraction:.0%} with the plan, {off.hidden_fraction:.0%} off; "
                 f"predicted speed-up {off.step / best.step:.3f}x")
    return plan, "\n".join(lines)


def _as_planned(cfg: Config, plan: Plan) -> Config:
    """The config with the sharding the plan chose (the planner may take fsdp where it is faster)."""
    if plan.grad_sync != "fsdp" or cfg.parallel.fsdp:
        return cfg
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, fsdp=True),
                               schedule=dataclasses.replace(cfg.schedule, grad_sync="all_reduce"))


def measured_report(cfg: Config, device: torch.device) -> str:
    """Profile this machine on the real process groups (cached) and report the plan. Collective."""
    pmesh = build_mesh(cfg.parallel.ep, device.type, cfg.parallel.timeout_s, cfg.parallel.ranks_per_node)
    w = workload(cfg, pmesh.dp, act_bytes(cfg, device), pmesh.ranks_per_node)
    profile, cached = load_or_measure(cfg.model, w, pmesh, device, resolve_dtype(cfg.train.dtype, device),
                                      profile_cache_dir())
    source = f"a profile of this machine ({'cached' if cached else 'measured now'}, key {profile.key})"
    costs = MeasuredCosts(profile)
    plan, report = plan_report(cfg, w, costs, source)
    return "\n".join([report, routing_bound_report(cfg, w, costs),
                      memory_report(_as_planned(cfg, plan), pmesh.dp, w.act_bytes)])


def hardware_report(cfg: Config, world_size: int, hardware_path: str) -> str:
    """Plan for a described machine: no processes, no measurement."""
    hw = load_hardware(hardware_path)
    ranks_per_node = cfg.parallel.ranks_per_node or min(hw.devices_per_node, world_size)
    check_node_layout(cfg, world_size, ranks_per_node)
    w = workload(cfg, world_size, hw.act_bytes, ranks_per_node)
    costs = HardwareCosts(hw)
    plan, report = plan_report(cfg, w, costs, f"the hardware description {hw.name} ({hardware_path})")
    return "\n".join([report, routing_bound_report(cfg, w, costs),
                      memory_report(_as_planned(cfg, plan), world_size, hw.act_bytes, hw.memory_gb, hw.name)])
