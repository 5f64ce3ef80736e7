"""Bodies of multi-process tests; run through multiprocess.run_distributed (importable by spawned workers)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from moeyard.models import GroupedExperts
from moeyard.models.moe.layer import LocalExchange
from moeyard.models.moe.permutation import expert_capacity, permute, plan_permutation, unpermute
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


def step_gradients_match_single_process(rank: int, world: int, ep: int, micro_batch_size: int,
                                        aux_loss_coef: float, router: str = "topk_softmax",
                                        balance_loss: str = "batch") -> dict:
    """train_step's scaled, reduced gradients and grad norm equal plain backprop of the global batch.

    The aux loss balances each (dp-wide) micro-batch, so with accumulation the
    reference matches only with aux_loss_coef=0.
    """
    import torch.nn.functional as nnf

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, top_k=1 if router == "switch" else 2, ffn_dim=32,
                                    num_shared_experts=1, aux_loss_coef=aux_loss_coef, router=router,
                                    balance_loss=balance_loss, dts_steps=4))
    per_rank = 2
    tokens = torch.randint(0, 64, (world * per_rank, 17), generator=torch.Generator().manual_seed(5))

    def prime_router_state(model) -> None:
        """Mid-schedule and with biases, so the test is not only about the routers' starting state."""
        for _, moe in model.moe_layers():
            if router == "sigmoid_bias":
                moe.router.expert_bias_E.copy_(torch.linspace(-0.05, 0.05, cfg.moe.num_experts))
            if router == "dense_to_sparse":
                moe.router.steps_done.fill_(2)  # 8 - 6 * 2 // 4 = 5 experts per token

    torch.manual_seed(0)
    reference = Transformer(cfg)
    prime_router_state(reference)
    out = reference(tokens[:, :-1])
    lm = nnf.cross_entropy(out.logits_BTV.flatten(0, 1), tokens[:, 1:].flatten())
    (lm + out.aux_loss + out.z_loss).backward()
    ref_norm = torch.sqrt(sum(p.grad.square().sum() for p in reference.parameters()))

    pmesh = build_mesh(ep, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    prime_router_state(model)
    apply_expert_parallel(model, pmesh)
    frozen = PlainSync(split_parameters(model), pmesh, torch.optim.SGD(model.parameters(), lr=0.0))
    result = train_step(model, frozen, tokens[rank * per_rank:(rank + 1) * per_rank], micro_batch_size=micro_batch_size,
                        pmesh=pmesh, lr=0.0, grad_clip=0.0, dtype=torch.float32)

    local = cfg.moe.num_experts // ep
    expert_names = {n for n, _ in model.named_parameters() if ".experts." in n}
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if name in expert_names:
            expected = expected[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert abs(result.grad_norm - float(ref_norm)) <= 1e-5 * float(ref_norm)
    assert abs(result.lm_loss - float(lm)) <= 1e-5 * float(lm)

    if router not in ("expert_choice", "switch"):  # expert skipping at evaluation: same logits and count at any ep
        ref_buffers = dict(reference.named_buffers())
        for name, b in model.named_buffers():  # router state after the step (biases, schedule) is replicated
            ref_buffers[name].copy_(b)
        for m in (reference, model):
            for _, moe in m.moe_layers():
                moe.cfg = dataclasses.replace(moe.cfg, skip_threshold=0.3)
                with torch.no_grad():  # peaked routing, as trained routers have, so that some weights are low
                    moe.router.weight_ED.mul_(50)
        with torch.no_grad():
            ref_out, out = reference.eval()(tokens[:, :-1]), model.eval()(tokens[rank * per_rank:(rank + 1) * per_rank, :-1])
        torch.testing.assert_close(out.logits_BTV, ref_out.logits_BTV[rank * per_rank:(rank + 1) * per_rank],
                                   rtol=1e-5, atol=1e-6)
        for layer, stats in out.moe_stats.items():
            assert int(stats.skipped) == int(ref_out.moe_stats[layer].skipped) > 0, layer
    return {"grad_norm": result.grad_norm}


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


def watch_launches(reducer, launches: list[bool]) -> None:
    """Record, for every bucket launch, whether it came during backward rather than from finish()."""
    launch, finish = reducer._launch, reducer.finish
    finishing = [False]

    def watched_launch(bucket) -> None:
        launches.append(not finishing[0])
        launch(bucket)

    def watched_finish() -> None:
        finishing[0] = True
        finish()
        finishing[0] = False

    reducer._launch, reducer.finish = watched_launch, watched_finish


def sync_strategies_agree(rank: int, world: int, ep: int, steps: int) -> dict:
    """Plain reduction, bucketed overlapped all-reduce and ZeRO reduce-scatter + sharded AdamW:
    the same parameters and AdamW state after `steps` steps (2 accumulated micro-steps each)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.buckets import BucketedReducer, backward_order, bucket_sizes
    from moeyard.parallel.grads.sync import OverlappedSync, PlainSync, ShardedSync
    from moeyard.parallel.grads.zero import ShardedAdamW
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32, num_shared_experts=1))
    pmesh = build_mesh(ep, "cpu")
    data = torch.randint(0, 64, (steps, world * 2, 17), generator=torch.Generator().manual_seed(11))
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def torch_adamw(model):
        params = list(model.parameters())
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=3e-3, betas=(0.9, 0.95), eps=1e-8)

    def run(kind: str):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_expert_parallel(model, pmesh)
        groups = split_parameters(model)
        small = 4096.0  # bytes: many small buckets, so several launch mid-backward
        dense = bucket_sizes([p.numel() * 4 for p in backward_order(groups.dense)], small)
        expert = bucket_sizes([p.numel() * 4 for p in backward_order(groups.expert)], small)
        launches: list[bool] = []  # per bucket launch: did it happen during backward (from a hook)?
        if kind == "plain":
            sync = PlainSync(groups, pmesh, torch_adamw(model))
        else:
            reducer = BucketedReducer(groups, pmesh, dense, expert, "all_reduce" if kind == "overlap"
                                      else "reduce_scatter")
            watch_launches(reducer, launches)
            sync = (OverlappedSync(groups, pmesh, torch_adamw(model), reducer) if kind == "overlap"
                    else ShardedSync(groups, pmesh, reducer, ShardedAdamW(reducer, **hyper)))
        norms = []
        for step in range(steps):
            result = train_step(model, sync, data[step, rank * 2:(rank + 1) * 2], micro_batch_size=1, pmesh=pmesh,
                                lr=3e-3, grad_clip=0.5, dtype=torch.float32)
            norms.append(result.grad_norm)
        states = sync.param_states()
        n_buckets = len(dense) + len(expert)
        if kind != "plain":
            assert len(launches) == steps * n_buckets, "a bucket was reduced on a non-final micro-step"
            assert sum(launches) >= steps, "no bucket was launched from a backward hook"
        return model, {n: states[id(p)] for n, p in model.named_parameters()}, norms, n_buckets

    ref_model, ref_states, ref_norms, _ = run("plain")
    init = dict(Transformer(cfg).named_parameters())  # only for names; values are not used
    worst = {}
    for kind in ("overlap", "zero"):
        model, states, norms, n_buckets = run(kind)
        assert n_buckets > 4
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"{kind} {name}: {m}")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(states[name][key], ref_states[name][key], rtol=1e-5, atol=1e-9,
                                           msg=lambda m: f"{kind} {name} {key}: {m}")
            assert float(states[name]["step"]) == float(ref_states[name]["step"]) == steps
        for a, b in zip(norms, ref_norms):
            assert abs(a - b) <= 1e-5 * b, f"{kind}: grad norm {a} vs {b}"
        worst[kind] = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(model.parameters(), ref_model.parameters()))
    assert set(init) == set(ref_states)
    return worst


def profile_and_cache(rank: int, world: int, cache_dir: str) -> dict:
    """The profiler measures on the real groups, every rank gets rank 0's numbers, the cache is reused."""
    from pathlib import Path

    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.parallel.scheduler.cost_model import workload_for
    from moeyard.trainer.schedule import load_or_measure

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


def pipelined_bf16_matches_plain(rank: int, world: int) -> dict:
    """Under bf16 autocast: r=4 vs r=1 agree to bf16 rounding; weight gradients stay float32."""
    pmesh = build_mesh(world, "cpu")
    g = torch.Generator().manual_seed(4321 + rank)
    x0, idx = torch.randn(T, D, generator=g), skewed_routing(g, T)
    w, dy = torch.rand(T, K, generator=g), torch.randn(T, D, generator=g)
    experts = GroupedExperts(E // world, D, F)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5 + rank)) * 0.2)

    def run(chunks: int):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = _layer(x, idx, w, experts, ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks), None)
        (y.float() * dy).sum().backward()
        return y.detach().float(), x.grad, [p.grad.clone() for p in experts.parameters()]

    y1, gx1, gw1 = run(1)
    y4, gx4, gw4 = run(4)
    assert all(p.grad.dtype == torch.float32 for p in experts.parameters())
    for a, b in [(y4, y1), (gx4, gx1), *zip(gw4, gw1)]:
        rel = float((a - b).norm() / b.norm())
        assert rel < 1e-2, f"bf16 pipelined differs by {rel:.2e} relative (bf16 has 8 bits of mantissa)"
    return {}


def nonfinite_step_is_skipped(rank: int, world: int) -> dict:
    """A NaN gradient on one rank: every rank skips the update (parameters and AdamW state unchanged)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.step import train_step

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))
    pmesh = build_mesh(world, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_expert_parallel(model, pmesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sync = PlainSync(split_parameters(model), pmesh, optimizer)
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    poison = [rank == 1]

    def maybe_nan(grad):
        return torch.full_like(grad, float("nan")) if poison[0] else grad

    model.output.weight.register_hook(maybe_nan)
    before = [p.detach().clone() for p in model.parameters()]
    bad = train_step(model, sync, batch, micro_batch_size=2, pmesh=pmesh, lr=1e-2, grad_clip=1.0, dtype=torch.float32)
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    poison[0] = False
    good = train_step(model, sync, batch, micro_batch_size=2, pmesh=pmesh, lr=1e-2, grad_clip=1.0, dtype=torch.float32)
    changed = not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return {"skipped": (bad.skipped, good.skipped), "unchanged_after_bad": unchanged, "changed_after_good": changed,
            "optimizer_steps": int(next(iter(optimizer.state.values()))["step"])}


def sigmoid_bias_balances(rank: int, world: int, corpus: str, steps: int, rate: float, skew: float,
                          seq: int, per_rank: int) -> dict:
    """Train the tiny config with sigmoid_bias routing from a deliberately skewed router (experts 0 and 1
    favoured by every token) and report the worst layer's max/mean expert load over the steps."""
    import numpy as np

    from moeyard import configs
    from moeyard.models import Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.config import load_config
    from moeyard.trainer.data.tokens import read_meta
    from moeyard.trainer.metrics import load_summary
    from moeyard.trainer.step import train_step

    cfg = load_config(configs.path("tiny.yaml"), [
        "model.moe.router=sigmoid_bias", f"model.moe.bias_update_rate={rate}", "model.moe.aux_loss_coef=0",
        f"parallel.ep={world}"]).model
    meta = read_meta(__import__("pathlib").Path(corpus))
    stream = np.fromfile(f"{corpus}/{meta['shards'][0]['file']}", dtype=np.uint16)
    starts = np.random.default_rng(0).integers(0, len(stream) - seq - 1, size=(steps, world * per_rank))

    torch.manual_seed(0)
    model = Transformer(cfg)
    captured = []
    hooks = [moe.router.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
             for _, moe in model.moe_layers()]
    with torch.no_grad():
        model(torch.from_numpy(stream[:seq].astype(np.int64)).view(1, -1))
        for (_, moe), x in zip(model.moe_layers(), captured):
            mean_D = x.reshape(-1, x.shape[-1]).mean(dim=0)
            skew_E = torch.zeros(cfg.moe.num_experts)
            skew_E[:2] = skew  # the average token's logit rises by `skew` for experts 0 and 1
            moe.router.weight_ED += skew_E[:, None] * mean_D[None, :] / mean_D.square().sum()
    for hook in hooks:
        hook.remove()

    pmesh = build_mesh(world, "cpu")
    apply_expert_parallel(model, pmesh)
    sync = PlainSync(split_parameters(model), pmesh, torch.optim.AdamW(model.parameters(), lr=1e-3))
    worst = []
    for step in range(steps):
        rows = [stream[s:s + seq + 1].astype(np.int64) for s in starts[step, rank * per_rank:(rank + 1) * per_rank]]
        result = train_step(model, sync, torch.from_numpy(np.stack(rows)), micro_batch_size=per_rank, pmesh=pmesh,
                            lr=1e-3, grad_clip=1.0, dtype=torch.float32)
        worst.append(max(load_summary(c)["max_over_mean"] for c in result.expert_load.values()))
    biases = {layer: moe.router.expert_bias_E.tolist() for layer, moe in model.moe_layers()}
    return {"worst_max_over_mean": worst, "biases": biases}
