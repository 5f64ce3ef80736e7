"""The model as single-device code: no process group anywhere."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.errors import ConfigError
from moeyard.models import GroupedExperts, ModelConfig, MoE, MoEConfig, Transformer
from moeyard.models.moe.expert_loop import expert_mlp_fused_loop
from moeyard.models.moe.expert_mlp import ExpertActivation, expert_mlp_reference
from moeyard.models.moe.experts import expert_mlp_grouped_mm, grouped_mm_unsupported, padded_groups
from moeyard.models.moe.routers import TopKRouter, load_balance_loss, router_z_loss
from moeyard.models.weight_steps import deferring_weight_gradients
from moeyard.trainer.step import skip_counts


def _fast_grouped_mm_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a GPU (benchmarks/gpu_check.sh runs these)"
    reason = grouped_mm_unsupported(torch.empty(1, 8, device="cuda", dtype=torch.bfloat16))
    return None if reason is None else f"the grouped GEMM's fast kernel does not run here: {reason}"


needs_cuda = pytest.mark.skipif(_fast_grouped_mm_missing() is not None, reason=str(_fast_grouped_mm_missing()))


def tiny(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                       moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, **moe))


def test_forward_backward_without_process_group() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    model = Transformer(tiny(num_shared_experts=1))
    out = model(torch.randint(0, 64, (2, 16)))
    assert out.logits_BTV.shape == (2, 16, 64)
    assert set(out.moe_stats) == {0, 1, 2, 3}
    for stats in out.moe_stats.values():
        assert int(stats.tokens_per_expert_E.sum()) == 2 * 16 * 2
    (out.logits_BTV.square().mean() + out.aux_loss + out.z_loss).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dense_and_moe_blocks_interleave() -> None:
    cfg = ModelConfig(n_layers=6, moe=MoEConfig(first_dense_layers=1, every=2))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    model = Transformer(tiny(first_dense_layers=2))
    assert [i for i, _ in model.moe_layers()] == [2, 3]


def test_same_seed_same_model() -> None:
    torch.manual_seed(3)
    a = Transformer(tiny())
    torch.manual_seed(3)
    b = Transformer(tiny())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


EXPERT_MLPS = {"swiglu": (False, ExpertActivation()),
               # GPT-OSS's: biases, and a clamp low enough that many values in these tests are clamped
               "biased clamped": (True, ExpertActivation("swiglu_clamped", alpha=1.702, limit=0.7))}


def _expert_weights(E: int, D: int, F: int, biased: bool, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    shapes = [(E, D, F), (E, D, F), (E, F, D)] + ([(E, F), (E, F), (E, D)] if biased else [])
    return [torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in shapes]


@pytest.mark.parametrize("mlp", list(EXPERT_MLPS))
@pytest.mark.parametrize("shuffled", [False, True])
def test_grouped_mm_matches_the_reference_including_empty_experts(shuffled: bool, mlp: str) -> None:
    """The padded grouped GEMM (the GPU path, which torch also runs on CPU) gives the reference's outputs and
    gradients, rows in expert order or through `order`, biases and the clamped activation included; experts
    without rows get exactly zero gradient (their biases too: padding rows pass none)."""
    torch.manual_seed(0)
    biased, activation = EXPERT_MLPS[mlp]
    rows = [5, 0, 7, 0]
    x = torch.randn(12, 8, requires_grad=True)
    weights = _expert_weights(4, 8, 16, biased)
    dy = torch.randn(12, 8)
    order = torch.randperm(12) if shuffled else None
    y_ref = expert_mlp_reference(x, rows, weights, activation, order)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [x, *weights])
    y_gmm = expert_mlp_grouped_mm(x, torch.tensor(rows), weights, activation, order)
    grads_gmm = torch.autograd.grad((y_gmm * dy).sum(), [x, *weights])
    torch.testing.assert_close(y_gmm, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_gmm, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for g in grads_gmm[1:]:
        assert torch.count_nonzero(g[1]) == 0 and torch.count_nonzero(g[3]) == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_padded_groups_give_every_expert_a_nonzero_multiple_of_the_alignment(dtype: torch.dtype) -> None:
    counts = torch.tensor([0, 1, 8, 9, 0, 17], dtype=dtype)
    dest, offs, total = padded_groups(counts, int(counts.sum()), align=8)
    sizes = torch.diff(offs, prepend=torch.zeros(1, dtype=offs.dtype))
    assert total == 40 + 8 * 6 and offs[-1] == total and offs.dtype == torch.int32
    assert all(s > 0 and s % 8 == 0 for s in sizes.tolist()) and sizes[-1] >= 24
    starts = (offs - sizes).tolist()
    first = 0
    for e, n in enumerate(counts.tolist()):  # each expert's rows sit, in order, at the start of its group
        assert dest[first:first + n].tolist() == list(range(starts[e], starts[e] + n))
        first += n


def test_grouped_mm_is_refused_where_it_is_not_sound(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = GroupedExperts(4, 16, 32, compute="grouped_mm")
    assert experts.uses_grouped_mm(torch.randn(3, 16))
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    with pytest.raises(ValueError, match=r"grouped_mm cannot run here: torch 2.8.0\+cu128 has no CPU grouped GEMM"):
        experts.uses_grouped_mm(torch.randn(3, 16))
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    with pytest.raises(ValueError, match=r"grouped_mm cannot run here: torch 2.7.1 is older than 2.8"):
        experts.uses_grouped_mm(torch.randn(3, 16))
    assert not GroupedExperts(4, 16, 32, compute="auto").uses_grouped_mm(torch.randn(3, 16))


@pytest.mark.parametrize("mlp", list(EXPERT_MLPS))
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_fused_expert_loop_matches_the_reference(recompute: str, mlp: str) -> None:
    """The hand-written backward (and its recomputing variants) gives autograd's gradients, biases and the
    clamped activation included; empty experts get zero weight gradients, not stale memory."""
    torch.manual_seed(0)
    biased, activation = EXPERT_MLPS[mlp]
    rows = [5, 0, 7, 0]
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    weights = _expert_weights(4, 8, 16, biased, torch.float64)
    dy = torch.randn(12, 8, dtype=torch.float64)
    y_ref = expert_mlp_reference(x, rows, weights, activation)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [x, *weights])
    y = expert_mlp_fused_loop(x, rows, weights, activation, recompute)
    grads = torch.autograd.grad((y * dy).sum(), [x, *weights])
    with pytest.raises(RuntimeError, match="freed"):  # activations go with the backward, not with the graph
        y.grad_fn.saved_tensors
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for g in grads[1:]:
        assert torch.count_nonzero(g[1]) == 0
    assert torch.autograd.gradcheck(lambda *t: expert_mlp_fused_loop(t[0], rows, t[1:], activation, recompute),
                                    (x, *weights))


@pytest.mark.parametrize("mlp", list(EXPERT_MLPS))
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("variant", ["grouped rows", "through order", "gate frozen", "bf16 autocast"])
def test_deferred_weight_step_gives_the_same_gradients(variant: str, recompute: str, mlp: str) -> None:
    """Inside deferring_weight_gradients the backward leaves the experts' weights without gradient and queues
    one weight step, which adds exactly what the plain backward computes to their .grad (on top of a gradient
    already there); frozen weights get none; under autocast the bf16 loop's gradients reach the float32
    parameters; the input's gradient is the plain backward's. The input is not a leaf (as in a model)."""
    torch.manual_seed(3)
    biased, activation = EXPERT_MLPS[mlp]
    rows, order = [5, 0, 7, 4], (torch.randperm(16) if variant == "through order" else None)
    experts = GroupedExperts(4, 8, 16, compute="loop", recompute=recompute, bias=biased, activation=activation)
    for w in experts.weights:
        torch.nn.init.normal_(w, std=0.3)
    if variant == "gate frozen":
        experts.w_gate_EDF.requires_grad_(False)
    x0, dy = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    trained = [w for w in experts.weights if w.requires_grad]

    def backward(defer: bool) -> tuple[Tensor, list[Tensor], list]:
        for w in trained:
            w.grad = torch.ones_like(w)  # an earlier micro-batch's
        x0.grad = None
        queue: list = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16 autocast"):
            y = experts(x0 * 2, rows, order)
        with deferring_weight_gradients(queue) if defer else torch.enable_grad():
            y.float().backward(dy)
        if defer:
            assert all(torch.equal(w.grad, torch.ones_like(w)) for w in trained), "the backward computed them"
        for step in queue:
            step()
        return x0.grad.clone(), [w.grad - 1 for w in trained], queue

    x_plain, plain, none = backward(defer=False)
    x_deferred, deferred, queue = backward(defer=True)
    assert none == [] and len(queue) == 1
    assert all(torch.count_nonzero(d) > 0 for d in deferred), "the weight step added nothing"
    torch.testing.assert_close(x_deferred, x_plain, rtol=0, atol=0)
    for a, b in zip(deferred, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert variant != "gate frozen" or experts.w_gate_EDF.grad is None


@pytest.mark.parametrize("mlp", list(EXPERT_MLPS))
@pytest.mark.parametrize("compute", ["loop", "grouped_mm"])
def test_experts_regroup_rows_through_an_order(compute: str, mlp: str) -> None:
    """Rows in (source rank, expert) order with `order` give the expert-grouped result, in place, on both
    fast paths, biased and clamped experts included (GPT-OSS's take the grouped GEMM too)."""
    torch.manual_seed(2)
    biased, activation = EXPERT_MLPS[mlp]
    experts = GroupedExperts(3, 8, 16, compute, bias=biased, activation=activation)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rows = [4, 0, 5]
    order = torch.randperm(9)
    x = torch.randn(9, 8, requires_grad=True)
    dy = torch.randn(9, 8)
    y = experts(x, rows, order=order)
    grads = torch.autograd.grad((y * dy).sum(), [x, *experts.parameters()])
    y_ref = expert_mlp_reference(x, rows, experts.weights, activation, order)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), [x, *experts.parameters()])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_recompute_experts_keeps_the_model_function() -> None:
    torch.manual_seed(1)
    plain = Transformer(tiny())
    recomputing = Transformer(tiny(recompute_experts=True))
    recomputing.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    grads = []
    for model in (plain, recomputing):
        out = model(tokens)
        out.logits_BTV.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_router_topk_and_renormalisation() -> None:
    router = TopKRouter(2, 3, top_k=2, renormalize=True)
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    routing = router(torch.tensor([[2.0, 1.0]]))
    assert routing.expert_index_NK.tolist() == [[0, 1]]
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(routing.weight, (p[:2] / p[:2].sum()).unsqueeze(0))
    router.renormalize = False
    torch.testing.assert_close(router(torch.tensor([[2.0, 1.0]])).weight, p[:2].unsqueeze(0))


def test_load_balance_loss_is_one_when_balanced_and_larger_when_not() -> None:
    uniform = torch.full((8, 4), 0.25)
    assert load_balance_loss(uniform, torch.tensor([4, 4, 4, 4])).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    assert load_balance_loss(skewed, torch.tensor([16, 0, 0, 0])).item() == pytest.approx(4 * 0.7)


def test_z_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_capacity_factor_reports_drops() -> None:
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=1, ffn_dim=8, capacity_factor=1.0))
    with torch.no_grad():
        moe.router.weight_ED.zero_()
        moe.router.weight_ED[2] = 1.0  # every token with a positive sum goes to expert 2
        for p in moe.experts.parameters():
            p.normal_()
    x = torch.randn(1, 32, 16).abs()
    _, stats = moe(x)
    assert stats.tokens_per_expert_E.tolist() == [0, 0, 32, 0]
    assert int(stats.dropped) == 32 - 8  # capacity ceil(1.0 * 32 / 4) = 8


def test_top1_router_learns_from_the_language_model_loss() -> None:
    """Renormalising a single weight would make it 1 and cut the router off from the LM gradient."""
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=1, ffn_dim=8, renormalize=True))
    for p in moe.parameters():  # modules leave init to Transformer.init_weights
        torch.nn.init.normal_(p, std=0.1)
    y, _ = moe(torch.randn(1, 8, 16))
    y.square().sum().backward()  # no router losses in this objective
    assert moe.router.weight_ED.grad.norm() > 1e-3


def test_grouped_mm_under_bf16_autocast_matches_loop_and_rejects_misaligned_dims() -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 32, compute="grouped_mm")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, rows = torch.randn(10, 16), [3, 0, 5, 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_gmm = experts(x, rows)
        experts.compute = "loop"
        y_loop = experts(x, rows)
    assert y_gmm.dtype == torch.bfloat16
    torch.testing.assert_close(y_gmm.float(), y_loop.float(), rtol=2e-2, atol=2e-2)
    odd = GroupedExperts(2, 12, 20, compute="grouped_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="multiples of 8"):
        odd(torch.randn(4, 12), [2, 2])


def test_model_without_moe_block_is_rejected() -> None:
    with pytest.raises(ConfigError, match="model.moe.first_dense_layers=4 leaves no MoE block"):
        ModelConfig(n_layers=4, moe=MoEConfig(first_dense_layers=4))


@needs_cuda
def test_cuda_grouped_mm_layer_matches_the_loop_in_bf16() -> None:
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig(num_experts=8, top_k=2, ffn_dim=128, expert_compute="grouped_mm")).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_gmm, _ = moe(x)
    moe.experts.compute = "loop"
    y_loop, _ = moe(x)  # float32 reference
    torch.testing.assert_close(y_gmm.float(), y_loop, rtol=3e-2, atol=3e-2)


@needs_cuda
def test_cuda_grouped_mm_defers_its_weight_gradients_in_bf16() -> None:
    """A zero-bubble weight step on the GPU path (models/weight_steps.py): armed and deferring, the grouped GEMM
    queues its three weight GEMMs, which give the plain backward's gradients to bf16's precision."""
    from moeyard.models.weight_steps import splitting_backward

    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128, compute="grouped_mm").cuda()
    for w in experts.weights:
        torch.nn.init.normal_(w, std=0.05)
    x, dy = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    rows = torch.tensor([9, 0, 7, 9, 0, 7, 18, 14], device="cuda")  # 64 rows, two experts without any

    def grads(defer: bool) -> tuple[list[Tensor], int]:
        for w in experts.weights:
            w.grad = None
        queue: list = []
        with splitting_backward(defer), torch.autocast("cuda", dtype=torch.bfloat16):
            y = experts(x, rows)
        with deferring_weight_gradients(queue) if defer else torch.enable_grad():
            y.float().backward(dy)
        for step in queue:
            step()
        return [w.grad.clone() for w in experts.weights], len(queue)

    (plain, none), (deferred, queued) = grads(False), grads(True)
    assert none == 0 and queued == 3
    for a, b in zip(deferred, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_cuda_layer_forward_backward_never_waits_for_the_host() -> None:
    """ep=1, dropless, grouped GEMM: no device-to-host synchronisation anywhere in the layer."""
    moe = MoE(64, MoEConfig(num_experts=8, top_k=2, ffn_dim=128, expert_compute="grouped_mm")).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 64, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the grouped GEMM's fast kernel takes bf16 only
        moe(x)[0].float().sum().backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = moe(x)
            loss = y.float().sum() + stats.aux_loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_expert_skipping_at_evaluation_drops_only_low_weight_later_choices() -> None:
    """Each token's output is w1 * E1(x) plus w2 * E2(x) only where w2 >= the threshold; the count of left-out
    copies is reported; training never skips."""
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=24, skip_threshold=0.3))
    with torch.no_grad():
        for p in moe.parameters():  # a bare layer: Transformer.init_weights is not there to initialise it
            p.normal_(0.0, 0.1)
        moe.router.weight_ED.mul_(20)  # peaked routing, as a trained router's
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        routing = moe.router(x)
        y, stats = moe.eval()(x)
        y_train, train_stats = moe.train()(x)
    x_ND = x.reshape(-1, 16)
    expected = torch.zeros_like(x_ND)
    w = moe.experts
    for t in range(x_ND.shape[0]):
        for slot, (e, weight) in enumerate(zip(routing.expert_index_NK[t].tolist(), routing.weight[t].tolist())):
            if slot == 0 or weight >= 0.3:
                h = torch.nn.functional.silu(x_ND[t] @ w.w_gate_EDF[e]) * (x_ND[t] @ w.w_up_EDF[e])
                expected[t] += weight * (h @ w.w_down_EFD[e])
    low = int((routing.weight[:, 1:] < 0.3).sum())
    assert 0 < low < x_ND.shape[0]  # the threshold cuts through the second choices
    assert int(stats.skipped) == low and int(stats.tokens_per_expert_E.sum()) == 2 * x_ND.shape[0] - low
    torch.testing.assert_close(y.reshape(-1, 16), expected, rtol=1e-5, atol=1e-6)
    assert int(train_stats.skipped) == 0 and not torch.allclose(y_train, y)
    assert float(skip_counts({1: stats})[0] / skip_counts({1: stats})[1]) == low / (2 * x_ND.shape[0])
    moe.cfg = dataclasses.replace(moe.cfg, capacity_factor=0.5)  # drops do not change what was skipped of all
    with torch.no_grad():
        _, dropping = moe.eval()(x)
    assert int(dropping.dropped) > 0
    assert float(skip_counts({1: dropping})[0] / skip_counts({1: dropping})[1]) == low / (2 * x_ND.shape[0])
    with pytest.raises(ConfigError, match="model.moe.skip_threshold=1.5 must be in"):
        MoEConfig(skip_threshold=1.5)


def test_unpermute_keeps_bf16_rows_for_backward_and_matches_autograd() -> None:
    """The weighted combine sums in float32 but saves the expert rows in their own dtype; its gradients equal
    plain autograd's over the float32 computation."""
    from moeyard.models.moe.permutation import plan_permutation, unpermute

    torch.manual_seed(0)
    T, K, E, D = 16, 2, 4, 8
    perm = plan_permutation(torch.randint(0, E, (T, K)), E, None)
    y = torch.randn(T * K, D).bfloat16().requires_grad_()
    w = torch.rand(T, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = unpermute(y, perm, w)
    assert out.dtype == torch.float32
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == (T * K, D)], "a float32 copy of the rows"
    dy = torch.randn(T, D)
    grads = torch.autograd.grad((out * dy).sum(), (y, w))
    ref = torch.zeros(T, D).index_add(0, perm.token_index_S,
                                      y.float() * w.reshape(-1)[perm.copy_index_S].unsqueeze(-1))
    ref_grads = torch.autograd.grad((ref * dy).sum(), (y, w))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("version,capability,runs", [
    ("2.8.0+cu128", (9, 0), True), ("2.8.0+cu128", (10, 0), False), ("2.9.1", (10, 0), True),
    ("2.11.0+cu130", (9, 0), True), ("2.13.0", (8, 0), False), ("2.7.1", (9, 0), False)])
def test_grouped_gemm_is_taken_where_the_release_has_the_gpus_kernel(version, capability, runs) -> None:
    """torch 2.8 already has the sm90 kernel (refusing it there cost Hopper users the grouped GEMM)."""
    rows = torch.empty(1, 8, dtype=torch.bfloat16)
    reason = grouped_mm_unsupported(rows, version, capability)
    assert (reason is None) == runs, reason
    assert grouped_mm_unsupported(rows.float(), version, capability) is not None, "the fast kernel is bf16 only"
    cpu_kernel = tuple(int(n) for n in version.split("+")[0].split(".")[:2]) >= (2, 9)
    assert (grouped_mm_unsupported(rows, version) is None) == cpu_kernel, "a CPU kernel from 2.9 on"
