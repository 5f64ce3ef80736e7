"""Bodies of multi-process tests (run through helpers.multiprocess.run_distributed, which spawned workers
import by name); the tests check what they return."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeyard.models import GroupedExperts
from moeyard.models.moe.layer import LocalExchange
from moeyard.models.moe.permutation import expert_capacity, permute, plan_permutation, unpermute
from moeyard.parallel import ExpertParallelExchange, build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def _layer(x_ND, idx_NK, w_NK, experts, exchange, capacity):
    perm = plan_permutation(idx_NK, E, capacity)
    y_SD = exchange.run_experts(permute(x_ND, perm), perm.tokens_per_expert_E, experts)
    return unpermute(y_SD, perm, w_NK), perm


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

    load = exchange.sum_over_batch(torch.cat([perm.routed_per_expert_E, perm.dropped.view(1)])).value
    return {"routed": load[:-1].tolist(), "dropped": int(load[-1]), "local_dropped": int(perm.dropped),
            "kept_per_expert": perm.tokens_per_expert_E.tolist(), "capacity": capacity}


def zero_rows_for_one_rank(rank: int, world: int) -> dict:
    """Every token picks experts of ep rank 0 only: rank 1's experts receive no rows at all."""
    pmesh = build_mesh(world, "cpu")
    g = torch.Generator().manual_seed(99)
    local = E // world
    idx = torch.stack([torch.randperm(local, generator=g)[:K] for _ in range(T)])  # experts 0..local-1
    x = torch.randn(T, D, generator=g).requires_grad_()
    w = torch.rand(T, K, generator=g)
    experts = GroupedExperts(local, D, F)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2, generator=g)
    exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group)
    y, _ = _layer(x, idx, w, experts, exchange, None)
    y.square().sum().backward()
    grads = [p.grad for p in experts.parameters()]
    return {"grad_is_none": [gr is None for gr in grads],
            "grad_norm": sum(float(gr.norm()) for gr in grads if gr is not None)}


def pipelined_matches_plain(rank: int, world: int, ep: int, capacity_factor: float | None,
                            chunk_options: tuple[int, ...]) -> dict:
    """r-chunk pipelined exchange vs r=1: outputs, input grads and expert weight grads, skewed routing."""
    pmesh = build_mesh(ep, "cpu")
    g = torch.Generator().manual_seed(4321 + rank)
    x0 = torch.randn(T, D, generator=g)
    idx = skewed_routing(g, T)
    w = torch.rand(T, K, generator=g)
    dy = torch.randn(T, D, generator=g)
    local = E // ep
    experts = GroupedExperts(local, D, F)
    wg = torch.Generator().manual_seed(77 + pmesh.ep_rank)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=wg) * 0.2)
    capacity = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)

    def run(chunks: int):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks=chunks)
        y, _ = _layer(x, idx, w, experts, exchange, capacity)
        (y * dy).sum().backward()
        return y.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]

    y_ref, gx_ref, gw_ref = run(1)
    with torch.no_grad():  # evaluation: same output, and no per-chunk graph kept
        exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks=4)
        y_eval, _ = _layer(x0, idx, w, experts, exchange, capacity)
    assert not y_eval.requires_grad
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-6, atol=1e-6 * float(y_ref.abs().max()))
    worst = 0.0
    for chunks in chunk_options:
        y, gx, gw = run(chunks)
        for a, b in [(y, y_ref), (gx, gx_ref), *zip(gw, gw_ref)]:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
            worst = max(worst, float((a - b).norm() / b.norm()))
    return {"worst_rel": worst}


def _one_layer(rank: int, world: int, hidden: int = F):
    """The mesh over all ranks, this rank's tokens, skewed routing, routing weights, an output gradient, and
    its share of the experts (E / world of them, weights seeded per rank)."""
    pmesh = build_mesh(world, "cpu")
    g = torch.Generator().manual_seed(4321 + rank)
    x0, idx = torch.randn(T, D, generator=g), skewed_routing(g, T)
    w, dy = torch.rand(T, K, generator=g), torch.randn(T, D, generator=g)
    experts = GroupedExperts(E // world, D, hidden)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5 + rank)) * 0.2)
    return pmesh, x0, idx, w, dy, experts


def pipelined_bf16_matches_plain(rank: int, world: int) -> dict:
    """Under bf16 autocast: the weight gradients' dtypes, and the largest relative difference of r=4 from r=1
    (output, input gradient, weight gradients)."""
    pmesh, x0, idx, w, dy, experts = _one_layer(rank, world)

    def run(chunks: int):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = _layer(x, idx, w, experts, ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks), None)
        (y.float() * dy).sum().backward()
        return y.detach().float(), x.grad, [p.grad.clone() for p in experts.parameters()]

    y1, gx1, gw1 = run(1)
    y4, gx4, gw4 = run(4)
    return {"grad_dtypes": [str(p.grad.dtype) for p in experts.parameters()],
            "worst_rel": max(float((a - b).norm() / b.norm()) for a, b in [(y4, y1), (gx4, gx1), *zip(gw4, gw1)])}


def pipelined_fp8_casts_each_weight_once(rank: int, world: int) -> dict:
    """train.fp8 experts in the pipelined exchange: r = 4 against r = 1 (largest relative difference over the
    output, input gradient and weight gradients), and how many weight operands were quantized in each run."""
    import moeyard.models.float8 as float8

    pmesh, x0, idx, w, dy, experts = _one_layer(rank, world, hidden=32)  # FP8 widths: multiples of 16
    experts.fp8 = True
    quantize_rows, casts = float8.quantize_rows, []
    # the executor's weight copies share the parameters' storage (same dtype): a cast reading one is a weight's
    storages = {p.untyped_storage().data_ptr() for p in experts.parameters()}

    def counting(t: torch.Tensor):
        casts[-1] += t.untyped_storage().data_ptr() in storages
        return quantize_rows(t)

    float8.quantize_rows = counting
    try:
        def run(chunks: int):
            experts.zero_grad(set_to_none=True)
            casts.append(0)
            x = x0.clone().requires_grad_()
            y, _ = _layer(x, idx, w, experts, ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks), None)
            (y * dy).sum().backward()
            return y.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]

        y1, gx1, gw1 = run(1)
        y4, gx4, gw4 = run(4)
    finally:
        float8.quantize_rows = quantize_rows
    return {"weight_casts": casts, "local_experts": E // world,
            "worst_rel": max(float((a - b).norm() / b.norm()) for a, b in [(y4, y1), (gx4, gx1), *zip(gw4, gw1)])}


def fp8_dispatch_matches_fp8_experts(rank: int, world: int) -> dict:
    """train.fp8_dispatch against FP8 experts fed rows in float32, plain (r = 1) and pipelined (r = 2):
    whether outputs and input gradients are identical, the weight gradients' largest relative difference, and
    the dtypes and row widths each forward all-to-all of rows carried."""
    pmesh, x0, idx, w, dy, experts = _one_layer(rank, world, hidden=32)  # FP8 widths: multiples of 16
    experts.fp8 = True
    exchange_rows, payloads = dist.all_to_all_single, []

    def recording(out, inp, *args, **kwargs):
        if inp.dim() == 2:  # rows (the count exchange sends a vector)
            payloads.append((str(inp.dtype), inp.shape[1]))
        return exchange_rows(out, inp, *args, **kwargs)

    def run(chunks: int, fp8_dispatch: bool):
        experts.zero_grad(set_to_none=True)
        experts.fp8_dispatch = fp8_dispatch
        x = x0.clone().requires_grad_()
        y, _ = _layer(x, idx, w, experts, ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks), None)
        (y * dy).sum().backward()
        return y.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]

    result = {}
    for chunks in (1, 2):
        y0, gx0, gw0 = run(chunks, False)
        dist.all_to_all_single, payloads = recording, []
        try:
            y1, gx1, gw1 = run(chunks, True)
        finally:
            dist.all_to_all_single = exchange_rows
        result[chunks] = {"same_output": torch.equal(y1, y0), "same_input_grad": torch.equal(gx1, gx0),
                          "weight_grad_rel": [float((a - b).norm() / b.norm()) for a, b in zip(gw1, gw0)],
                          "payloads": payloads}
    return result


def pipelined_in_a_recomputed_block(rank: int, world: int) -> dict:
    """The pipelined exchange (r = 2) inside block_checkpoint (train.recompute=full) against no recompute:
    the largest relative difference of output, input gradient and weight gradients; and, after three
    forwards (micro-batches in flight) under bf16 autocast, how many received-row chunks and bf16 copies of
    the stacked weights are still alive, with and without the checkpoint."""
    import gc

    from moeyard.models.recompute import block_checkpoint

    pmesh, x0, idx, w, dy, experts = _one_layer(rank, world)
    exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, 2)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return _layer(x, idx, w, experts, exchange, None)[0]

    def run(recompute: bool):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = block_checkpoint(layer, x) if recompute else layer(x)
        (y * dy).sum().backward()
        return y.detach(), x.grad, [p.grad.clone() for p in experts.parameters()]

    (y0, gx0, gw0), (y1, gx1, gw1) = run(False), run(True)
    worst = max(float((a - b).norm() / b.norm()) for a, b in [(y1, y0), (gx1, gx0), *zip(gw1, gw0)])

    def alive(recompute: bool) -> tuple[int, int]:
        inputs, outputs = [], []
        for _ in range(3):
            inputs.append(x0.clone().requires_grad_())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(block_checkpoint(layer, inputs[-1]) if recompute else layer(inputs[-1]))
        gc.collect()
        mine = {id(t) for t in inputs}
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in mine]
        copies = sum(o.dtype == torch.bfloat16 and o.shape == experts.w_gate_EDF.shape for o in tensors)
        # the executor's received rows: leaves that take gradients, a row wide
        rows = sum(o.dim() == 2 and o.shape[1] == D and o.requires_grad and o.is_leaf for o in tensors)
        del inputs, outputs
        return rows, copies

    return {"worst_rel": worst, "plain": alive(False), "recomputed": alive(True)}
