"""Bodies of multi-process tests (run through helpers.multiprocess.run_distributed, which spawned workers
import by name); the tests check what they return."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeyard.parallel import build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def profile_and_cache(rank: int, world: int, cache_dir: str) -> dict:
    """The profiler measures on the real groups, every rank gets rank 0's numbers, the cache is reused."""
    from pathlib import Path

    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.trainer.scheduler.cost_model import workload_for
    from moeyard.trainer.scheduler.run_planning import load_or_measure

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=64))
    pmesh = build_mesh(world, "cpu")
    w = workload_for(cfg, tokens=512, seq_len=16, ep=world, dp=world, micro_steps=1)
    first, cached_first = load_or_measure(cfg, w, pmesh, torch.device("cpu"), torch.float32, Path(cache_dir))
    again, cached_again = load_or_measure(cfg, w, pmesh, torch.device("cpu"), torch.float32, Path(cache_dir))
    dist.barrier()
    if rank == 0:
        for path in Path(cache_dir).glob("profile-*.json"):
            path.write_text("{not json")
    dist.barrier()
    _, cached_after_corruption = load_or_measure(cfg, w, pmesh, torch.device("cpu"), torch.float32, Path(cache_dir))
    return {"first": first, "again": again, "cached": (cached_first, cached_again, cached_after_corruption)}


def profile_two_machines(rank: int, world: int) -> dict:
    """4 ranks as 2 machines x 2, one ep group: the profile times both stages of hierarchical dispatch, and the
    measured costs charge each stage from its own fit."""
    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.trainer.scheduler.cost_model import workload_for
    from moeyard.trainer.scheduler.measured_costs import MeasuredCosts, at
    from moeyard.trainer.scheduler.profiler import measure

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=64))
    pmesh = build_mesh(world, "cpu", ranks_per_node=2)
    w = workload_for(cfg, tokens=256, seq_len=16, ep=world, dp=world, micro_steps=1, ranks_per_node=2)
    profile = measure(cfg, w, pmesh, torch.device("cpu"), torch.float32, repeats=3)
    costs = MeasuredCosts(profile)
    nbytes = 100_000.0
    return {"node": profile.all_to_all_node, "cross": profile.all_to_all_cross,
            "cross_s": costs.staged_all_to_all(w, nbytes, "cross"), "cross_expected": at(profile.all_to_all_cross,
                                                                                       nbytes * 2),
            "node_s": costs.staged_all_to_all(w, nbytes, "node"), "node_expected": at(profile.all_to_all_node,
                                                                                    nbytes * 2)}
