"""Bodies of the hierarchical-dispatch tests: 4 ranks as 2 machines x 2, one ep group over all of them."""
from __future__ import annotations

import torch

from helpers.exchange_cases import D, E, F, K, T, skewed_routing
from helpers.host_syncs import counting_host_syncs
from moeyard.models import GroupedExperts
from moeyard.models.moe.permutation import Permutation, expert_capacity, plan_permutation
from moeyard.models.moe.routers import limit_to_best_blocks
from moeyard.parallel import ExpertParallelExchange, build_mesh
from moeyard.parallel.exchange.hierarchical import NodeGroups

RANKS_PER_NODE = 2


def node_limited_routing(generator: torch.Generator, tokens: int, nodes: int, keep: int) -> torch.Tensor:
    """Top-K of random scores restricted to each token's `keep` best of `nodes` expert blocks."""
    scores = torch.rand(tokens, E, generator=generator)
    return limit_to_best_blocks(scores, nodes, keep, -(-K // keep)).topk(K, dim=-1).indices


def expected_cross_rows(perm, node_index: int, nodes: int) -> tuple[int, int]:
    """(copies, distinct (token, machine) pairs) of the kept copies whose expert is on another machine,
    counted one by one on the host."""
    counts = perm.tokens_per_expert_E.tolist()
    experts = [e for e, n in enumerate(counts) for _ in range(n)]
    per_node = E // nodes
    copies, pairs = 0, set()
    for token, expert in zip(perm.token_index_S.tolist(), experts):
        if expert // per_node != node_index:
            copies += 1
            pairs.add((token, expert // per_node))
    return copies, len(pairs)


def hierarchical_matches_flat(rank: int, world: int) -> dict:
    """Hierarchical vs flat (r=1): outputs, input, routing-weight and expert gradients, dropless and with
    capacity, skewed and node-limited routing, chunks 1, 2 and 3; the counted cross-machine rows; and the host
    syncs of each exchange's forward and backward (helpers.host_syncs); and expert-choice routing, where a
    pair carries up to all of a machine's experts."""
    pmesh = build_mesh(world, "cpu", ranks_per_node=RANKS_PER_NODE)
    groups = NodeGroups(pmesh.node_group, pmesh.cross_group)
    nodes = world // RANKS_PER_NODE
    g = torch.Generator().manual_seed(4321 + rank)
    x0, dy, w0 = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    routings = {"skewed": skewed_routing(g, T), "one_node": node_limited_routing(g, T, nodes, 1)}
    experts = GroupedExperts(E // world, D, F)
    wg = torch.Generator().manual_seed(77 + pmesh.ep_rank)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=wg) * 0.2)

    syncs = {}

    def run(perm, dispatch: str, chunks: int, case: str = "", weight: torch.Tensor = w0):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), weight.clone().requires_grad_()
        exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks, dispatch, groups)
        with counting_host_syncs() as forward:
            y = exchange.run_routed(x, perm, w, experts)
        with counting_host_syncs() as backward:
            (y * dy).sum().backward()
        syncs[f"{dispatch}/{experts.compute}/{chunks}/{case}"] = (forward.count, backward.count,
                                                                  f"{forward}\n{backward}")
        rows, nbytes = exchange.traffic.read()
        return [y.detach(), x.grad, w.grad, *[p.grad.clone() for p in experts.parameters()]], rows, nbytes

    worst, traffic = 0.0, {}
    for name, idx in routings.items():
        for capacity_factor in (None, 1.0):
            capacity = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)
            perm = plan_permutation(idx, E, capacity)
            case = f"{name}/{capacity_factor}"
            reference, flat_rows, flat_bytes = run(perm, "flat", 1, case)
            for chunks in (1, 2, 3):  # 3: pieces of unequal size (48 tokens' pairs, per machine)
                got, rows, nbytes = run(perm, "hierarchical", chunks, case)
                for a, b in zip(got, reference):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
                    worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-30)))
            if capacity_factor is None and name == "skewed":  # the grouped GEMM reads its counts on the device
                experts.compute = "grouped_mm"
                run(perm, "hierarchical", 2, case)
                experts.compute = "auto"
            copies, pairs = expected_cross_rows(perm, groups.node_index, nodes)
            traffic[f"{name}/{capacity_factor}"] = {
                "flat_rows": flat_rows, "hier_rows": rows, "expected_copies": copies, "expected_pairs": pairs,
                "flat_bytes": flat_bytes, "hier_bytes": nbytes, "dropped": int(perm.dropped), "tokens": T}
    # Expert choice: each expert takes its C best tokens, so a (token, machine) pair can carry up to all X of
    # that machine's experts (the pair width is X, not top_k); weights [E, 1, C] as the router gives them.
    C = T * K // E
    weight_E1C, position_E1C = torch.rand(1, T, E, generator=g).transpose(1, 2).topk(C, dim=-1)
    choice = Permutation(token_index_S=position_E1C.permute(1, 0, 2).reshape(-1), copy_index_S=torch.arange(E * C),
                         tokens_per_expert_E=torch.full((E,), C), routed_per_expert_E=torch.full((E,), C),
                         num_tokens=T)
    reference, _, _ = run(choice, "flat", 1, "expert_choice", weight_E1C.permute(1, 0, 2))
    for chunks in (1, 2, 3):
        got, _, _ = run(choice, "hierarchical", chunks, "expert_choice", weight_E1C.permute(1, 0, 2))
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
            worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-30)))
    return {"worst_rel": worst, "traffic": traffic, "host_syncs": syncs}


def _two_machines(rank: int, world: int):
    """The mesh as machines of RANKS_PER_NODE ranks and their groups, this rank's tokens, output gradient and
    routing weights, a skewed routing planned, and its share of the experts (weights seeded per rank)."""
    pmesh = build_mesh(world, "cpu", ranks_per_node=RANKS_PER_NODE)
    groups = NodeGroups(pmesh.node_group, pmesh.cross_group)
    g = torch.Generator().manual_seed(99 + rank)
    x0, dy, w0 = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    perm = plan_permutation(skewed_routing(g, T), E, None)
    experts = GroupedExperts(E // world, D, F)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5 + rank)) * 0.2)
    return pmesh, groups, x0, dy, w0, perm, experts


def hierarchical_bf16_matches_flat(rank: int, world: int) -> dict:
    """Under bf16 autocast, where expert ids ride in bf16 rows as raw bits: the largest relative difference
    of hierarchical (chunks 2) from flat, output and gradients."""
    pmesh, groups, x0, dy, w0, perm, experts = _two_machines(rank, world)

    def run(dispatch: str, chunks: int):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks, dispatch, groups)
            y = exchange.run_routed(x.to(torch.bfloat16), perm, w, experts)
        (y.float() * dy).sum().backward()
        return [y.detach().float(), x.grad, w.grad, *[p.grad.clone() for p in experts.parameters()]]

    flat, hier = run("flat", 1), run("hierarchical", 2)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(hier, flat)]
    return {"worst_rel": max(rel), "routing_weight_grad_rel": rel[2]}


def expert_grads_reduced_during_backward(rank: int, world: int) -> dict:
    """Under FSDP2, whether each MoE layer's expert gradients were reduce-scattered by the time backward
    reaches that MoE layer's input (the experts unit's own post-backward, not a later one), flat and
    hierarchical, r = 1 and 2; and that both dispatches give the same expert gradients."""
    from torch.distributed.tensor import DTensor

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel
    from moeyard.parallel.fsdp import apply_fsdp

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32, first_dense_layers=1))
    pmesh = build_mesh(2, "cpu", ranks_per_node=1)  # ep 2 over 2 one-rank machines; edp 2 shards the experts
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    seen, grads = {}, {}
    for dispatch in ("flat", "hierarchical"):
        for chunks in (1, 2):
            torch.manual_seed(0)
            model = Transformer(cfg)
            apply_expert_parallel(model, pmesh, (chunks, chunks), (dispatch, dispatch))
            apply_fsdp(model, pmesh)
            experts = [moe.experts for _, moe in model.moe_layers()]
            assert all(p.to_local().numel() < p.numel() for e in experts for p in e.parameters())
            reduced = []
            for _, moe in model.moe_layers():
                def probe(grad, experts=moe.experts, reduced=reduced):
                    # after FSDP's post-backward the module holds its shards again, each with its reduced gradient
                    reduced.append(all(isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                                       and p.grad is not None for p in experts.parameters()))
                    return grad

                def on_moe_input(module, args, probe=probe) -> None:
                    args[0].register_hook(probe)

                moe.register_forward_pre_hook(on_moe_input)
            out = model(tokens)
            (out.logits_BTV.square().mean() + out.aux_loss).backward()
            seen[f"{dispatch}/{chunks}"] = reduced
            grads[f"{dispatch}/{chunks}"] = [p.grad.full_tensor() for e in experts for p in e.parameters()]
    worst = max(float((a - b).norm() / b.norm()) for key in grads
                for a, b in zip(grads[key], grads["flat/1"]))
    return {"reduced": seen, "worst_rel": worst}


def hierarchical_in_a_recomputed_block(rank: int, world: int) -> dict:
    """Hierarchical dispatch pipelined in 2 chunks inside block_checkpoint (train.recompute=full), whose
    executor runs its chunks again in backward with the machine's fan-out collectives, against no recompute:
    the largest relative difference of output and gradients (routing weights' and experts' included)."""
    from moeyard.models.recompute import block_checkpoint

    pmesh, groups, x0, dy, w0, perm, experts = _two_machines(rank, world)
    exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, 2, "hierarchical", groups)

    def run(recompute: bool):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()

        def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return exchange.run_routed(x, perm, w, experts)

        y = block_checkpoint(layer, x, w) if recompute else layer(x, w)
        (y * dy).sum().backward()
        return [y.detach(), x.grad, w.grad, *[p.grad.clone() for p in experts.parameters()]]

    import moeyard.parallel.exchange.overlap as overlap

    reruns, marked = [], overlap.in_recomputed_block
    overlap.in_recomputed_block = lambda: reruns.append(marked()) or reruns[-1]
    try:
        kept, recomputed = run(False), run(True)
    finally:
        overlap.in_recomputed_block = marked
    return {"worst_rel": max(float((a - b).norm() / b.norm()) for a, b in zip(recomputed, kept)),
            "executor_reruns": sum(reruns)}
