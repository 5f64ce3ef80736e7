"""Bodies of multi-process tests; run through multiprocess.run_distributed (importable by spawned workers)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeyard.models import GroupedExperts
from moeyard.models.moe import LocalExchange
from moeyard.models.permutation import expert_capacity, permute, plan_permutation, unpermute
from moeyard.parallel import ExpertParallelExchange, build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def skewed_routing(generator: torch.Generator, tokens: int) -> torch.Tensor:
    """First choice is HOT for 80% of tokens; COLD is never chosen."""
    allowed = torch.tensor([e for e in range(E) if e != COLD])
    first = torch.where(torch.rand(tokens, generator=generator) < 0.8, HOT,
                        allowed[torch.randint(len(allowed), (tokens,), generator=generator)])
    second = torch.empty_like(first)
    for t in range(tokens):
        options = allowed[allowed != first[t]]
        second[t] = options[torch.randint(len(options), (1,), generator=generator)]
    return torch.stack([first, second], dim=1)


def _layer(x_TD, idx_TK, w_TK, experts, exchange, capacity):
    perm = plan_permutation(idx_TK, E, capacity)
    y_SD = exchange.run_experts(permute(x_TD, perm), perm.tokens_per_expert_E, experts)
    return unpermute(y_SD, perm, w_TK), perm


def dispatch_round_trip(rank: int, world: int, ep: int, capacity_factor: float | None) -> dict:
    """EP exchange vs the whole computation in one process: outputs, input grads and expert grads."""
    pmesh = build_mesh(ep, "cpu")
    g = torch.Generator().manual_seed(1234)  # every rank draws the same global problem
    x_all = torch.randn(world, T, D, generator=g)
    idx_all = torch.stack([skewed_routing(g, T) for _ in range(world)])
    w_all = torch.rand(world, T, K, generator=g)
    dy_all = torch.randn(world, T, D, generator=g)
    full = GroupedExperts(E, D, F)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    capacity = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)

    # Expert parallel: this rank's tokens, this rank's slice of the experts.
    local = E // ep
    experts = GroupedExperts(local, D, F)
    with torch.no_grad():
        for p, q in zip(experts.parameters(), full.parameters()):
            p.copy_(q[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local])
    x = x_all[rank].clone().requires_grad_()
    exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group)
    y, perm = _layer(x, idx_all[rank], w_all[rank], experts, exchange, capacity)
    (y * dy_all[rank]).sum().backward()

    # Reference: one process, all experts; expert grads only from this ep group's tokens.
    group_ranks = dist.get_process_group_ranks(pmesh.ep_group)
    for r in group_ranks:
        x_ref = x_all[r].clone().requires_grad_()
        y_ref, _ = _layer(x_ref, idx_all[r], w_all[r], full, LocalExchange(), capacity)
        (y_ref * dy_all[r]).sum().backward()
        if r == rank:
            y_mine, xgrad_mine = y_ref.detach(), x_ref.grad
    ref_grads = [q.grad[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local] for q in full.parameters()]

    torch.testing.assert_close(y.detach(), y_mine, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xgrad_mine, rtol=1e-5, atol=1e-6)
    for p, ref in zip(experts.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)

    load = exchange.sum_over_batch(torch.cat([perm.routed_per_expert_E, perm.dropped.view(1)]))
    return {"routed": load[:-1].tolist(), "dropped": int(load[-1]), "local_dropped": int(perm.dropped),
            "kept_per_expert": perm.tokens_per_expert_E.tolist(), "capacity": capacity}
