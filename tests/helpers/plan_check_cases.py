"""Bodies of the multi-process tests of the run's plan check (run through helpers.multiprocess)."""
from __future__ import annotations

import torch


def plan_check_decides_alike(rank: int, world: int, plan_ms: list[list[float]], reference_ms: list[list[float]]) -> dict:
    """Feed a PlanCheck 2 warm-up steps, then this rank's plan and reference step times; report the
    exchanges' pipeline degree during and after the trial, and the decision."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, build_mesh
    from moeyard.trainer.scheduler.plan_check import PlanCheck

    cfg = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=8,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    model = Transformer(cfg)
    apply_expert_parallel(model, build_mesh(world, "cpu"), (4, 2))
    check = PlanCheck.for_run(model, (4, 2), "planner", len(plan_ms[rank]), torch.device("cpu"))

    def degrees() -> list[int]:
        return [moe.exchange.chunks for _, moe in model.moe_layers()]

    seen, result = [], None
    for ms in [9.0, 9.0] + plan_ms[rank] + reference_ms[rank]:
        result = check.observe(ms / 1e3) or result
        seen.append(degrees())
    return {"degrees": seen, "switched": result.switched, "plan_s": result.plan_s,
            "reference_s": result.reference_s, "again": check.observe(1.0),
            "off_check": PlanCheck.for_run(model, (1, 1), "planner", 3, torch.device("cpu"))}


def profile_learns_the_chunk_cost(rank: int, world: int, cache: str) -> dict:
    """A cached profile in which pipelining is free; the run measured its r=(4, 2) plan 20% slower than r=1.
    After learning, the profile's cost per extra chunk explains that, and the planner picks r=1."""
    import dataclasses
    import json
    import os

    os.environ["MOEYARD_CACHE"] = cache  # the fork server's environment predates the test
    from moeyard import configs
    from moeyard.parallel.plan import Plan
    from moeyard.trainer.config.sections import read_config
    from moeyard.trainer.scheduler.measured_costs import MeasuredCosts, Profile, profile_from_dict
    from moeyard.trainer.scheduler.planner import search
    from moeyard.trainer.scheduler.run_planning import (
        _profile_path,
        act_bytes,
        learn_chunk_overhead,
        profile_cache_dir,
        workload,
    )

    device = torch.device("cpu")
    cfg = read_config(configs.path("tiny.yaml"), ["schedule.mode=auto", "parallel.ep=1"])
    w = workload(cfg, world, act_bytes(cfg, device))
    key, path = _profile_path(cfg.model, w, device, profile_cache_dir())
    line = (1e-4, 1e-9)
    profile = Profile(key, 1e-3, 2e-3, line, line, line, line, line, line, line, line, line, 1e-4, 1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(profile)))
    plan = Plan(chunks=(4, 2, 1), dense_buckets=(), expert_buckets=(), source="planner",
                predicted={"step_s": 1.0, "off_step_s": 1.05, "r1_step_s": 1.1})
    message = learn_chunk_overhead(cfg, world, device, plan, plan_s=1.2, reference_s=1.0)
    learned = profile_from_dict(json.loads(path.read_text()))
    replanned, _ = search(w, MeasuredCosts(learned))
    return {"message": message, "overhead": learned.chunk_overhead_s, "micro_steps": w.micro_steps,
            "replanned": replanned.chunks}
