"""What `moeyard plan` says about node-limited routing: the predicted step at M = 1, 2, 4 machines per token
and without a bound, each with the dispatch and pipeline the planner picks for it."""
from __future__ import annotations

import dataclasses
from typing import Optional

from moeyard.trainer.config.sections import Config
from moeyard.trainer.scheduler.cost_model import Costs, Workload
from moeyard.trainer.scheduler.machines import expected_nodes_per_token, machine_bound
from moeyard.trainer.scheduler.run_planning import auto_plan

BOUNDS: tuple[Optional[int], ...] = (1, 2, 4, None)


def routing_bound_rows(cfg: Config, w: Workload, costs: Costs) -> list[dict]:
    """One row per routing bound M that the model allows (top_k experts must fit in M machines)."""
    machines, moe = w.ep_nodes, cfg.model.moe
    # hierarchical dispatch weighed too, but not where train.fp8_dispatch keeps the flat exchange
    dispatch = "flat" if cfg.train.fp8_dispatch else "auto"
    auto = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, dispatch=dispatch))
    rows = []
    for bound in BOUNDS:
        if bound is not None and (bound >= machines or moe.top_k > bound * (moe.num_experts // machines)):
            continue
        nodes = expected_nodes_per_token(moe.num_experts, moe.top_k, machines, machine_bound(moe, machines, bound))
        bounded = dataclasses.replace(w, nodes_per_token=nodes)
        plan, best = auto_plan(auto, bounded, costs)
        hierarchical = sum(d == "hierarchical" for d in plan.dispatch)
        rows.append({"bound": bound, "nodes_per_token": nodes, "step_s": best.step,
                     "cross_mb": bounded.cross_node_bytes("hierarchical" if hierarchical else "flat") / 2**20,
                     "dispatch": f"hierarchical x{hierarchical}" if hierarchical else "flat",
                     "chunks": sorted(set(plan.chunks))})
    return rows


def routing_bound_report(cfg: Config, w: Workload, costs: Costs) -> str:
    if w.ep_nodes == 1:
        return ("node-limited routing: the ep group fits in one machine, so model.moe.max_nodes_per_token and "
                "hierarchical dispatch change nothing here")
    rows = routing_bound_rows(cfg, w, costs)
    free = next(r for r in rows if r["bound"] is None)
    groups = machine_bound(cfg.model.moe, w.ep_nodes, None)
    lines = [f"node-limited routing (model.moe.max_nodes_per_token = M), the ep group spans {w.ep_nodes} machines;"
             f" machines per token under uniform routing, the planner's dispatch for each"
             + (f" (the router's groups already bound a token to {groups} machines):" if groups else ":"),
             f"{'M':>6}{'machines/token':>16}{'MiB off-machine':>17}  {'dispatch':<18}{'step':>12}{'vs none':>9}"]
    for r in rows:
        bound = "none" if r["bound"] is None else str(r["bound"])
        lines.append(f"{bound:>6}{r['nodes_per_token']:>16.2f}{r['cross_mb']:>17.2f}  {r['dispatch']:<18}"
                     f"{r['step_s'] * 1e3:>10.3f}ms{free['step_s'] / r['step_s']:>8.3f}x")
    lines.append("  (MiB off-machine: one rank's forward dispatch in one MoE layer; the combine sends as much back)")
    return "\n".join(lines)
