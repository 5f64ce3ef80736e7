"""models/float8.py (train.fp8=rowwise): row-wise scaled e4m3 GEMMs, exact where the operands are
representable, within e4m3's rounding elsewhere, in the blocks' linear layers only; a model trained with them
follows the float32 one; a device that cannot run them is refused by name. CPU runs torch's reference
kernel; the GPU kernel (cuBLAS, sm89+) has never run here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moeyard.models import GroupedExperts, ModelConfig, MoEConfig, Transformer, float8
from moeyard.models.float8 import (
    E4M3_MAX,
    float8_grouped_unsupported,
    float8_mm,
    float8_unsupported,
    pack_rows,
    quantize_rows,
    quantize_weight,
    shared_weight_casts,
    unpack_rows,
)
from moeyard.models.layers import SwiGLU
from moeyard.models.moe.expert_mlp import ExpertActivation
from moeyard.models.mtp import MTPModule
from moeyard.models.weight_steps import Linear
from moeyard.trainer.loop import _check_fp8


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_row_scales_are_powers_of_two_that_fit_e4m3(monkeypatch) -> None:
    t = torch.randn(6, 40) * torch.logspace(-4, 4, 6).unsqueeze(1)
    t[2] = 0  # an all-zero row gets a finite scale and stays zero
    t8, scale = quantize_rows(t.t().contiguous().t())  # a column-major input comes back row-major
    assert t8.dtype == torch.float8_e4m3fn and t8.is_contiguous() and scale.shape == (6, 1)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round())), "scales are not powers of two"
    amax = t8.float().abs().amax(dim=1)
    nonzero = amax > 0
    assert torch.all(amax[nonzero] >= E4M3_MAX / 2) and torch.all(amax <= E4M3_MAX), amax  # >=: rounding
    assert not torch.any(t8[2].float()) and torch.isfinite(scale).all()
    assert _relative(t8.float() * scale, t) < 0.04
    # a device whose multiply cannot write e4m3 casts through a temporary: the same bits
    assert float8.multiply_writes_e4m3("cpu", torch.float32)
    monkeypatch.setattr(float8, "multiply_writes_e4m3", lambda device_type, dtype: False)
    slow8, slow_scale = quantize_rows(t.t().contiguous().t())
    assert torch.equal(slow8.view(torch.uint8), t8.view(torch.uint8)) and torch.equal(slow_scale, scale)


def test_representable_operands_multiply_exactly() -> None:
    """Small integers times powers of two are e4m3 values, so the scaled GEMM is exact: the scales decode what
    they encoded, also where K (37) is padded to the kernel's multiple of 16."""
    torch.manual_seed(0)
    a = torch.randint(-8, 9, (24, 37)).float() * 2.0 ** torch.randint(-3, 4, (24, 1)).float()
    b = torch.randint(-8, 9, (37, 32)).float() * 0.25
    assert torch.equal(float8_mm(a, b), a @ b)
    assert torch.equal(float8_mm(a.t().contiguous().t(), b.t().contiguous().t()), a @ b)


def test_random_operands_are_rounded_as_e4m3_rounds() -> None:
    """e4m3 keeps 3 mantissa bits (a relative step of 1/8 to 1/16): products of Gaussian operands land a few
    percent from float32's, never exactly on it."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 128), torch.randn(128, 48)
    error = _relative(float8_mm(a, b), a @ b)
    assert 1e-3 < error < 0.06, error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float8_mm(a.bfloat16(), b.bfloat16()).dtype == torch.bfloat16


def test_an_fp8_linear_layers_gradients_follow_the_plain_ones() -> None:
    torch.manual_seed(0)
    lin = Linear(64, 32, bias=True)
    lin.fp8 = True
    x = torch.randn(3, 7, 64, requires_grad=True)
    dy = torch.randn(3, 7, 32)
    lin(x).backward(dy)
    got = (x.grad, lin.weight.grad, lin.bias.grad)
    x2 = x.detach().clone().requires_grad_(True)
    w2, b2 = lin.weight.detach().clone().requires_grad_(True), lin.bias.detach().clone().requires_grad_(True)
    F.linear(x2, w2, b2).backward(dy)
    for name, g, want in zip(("input", "weight", "bias"), got, (x2.grad, w2.grad, b2.grad)):
        assert _relative(g, want) < 0.06, name
    assert _relative(got[0], x2.grad) > 1e-3, "the input gradient was not computed in FP8"
    assert torch.equal(got[2], b2.grad), "the bias gradient is a sum, not a GEMM: exact"


def _model(**moe) -> Transformer:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16,
                      mtp_layers=1, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, first_dense_layers=1,
                                                  num_shared_experts=1, shared_expert_gate=True, **moe))
    return Transformer(cfg)


def test_set_fp8_takes_the_blocks_linear_layers_whose_widths_allow() -> None:
    """Attention projections, dense and shared FFNs, the MTP projection and the routed experts; not the
    shared-expert gate (1 wide), the output layer or the routers."""
    model = _model()
    fp8, layers = model.set_fp8("rowwise")
    # 4 blocks (3 decoder, 1 MTP) x 4 attention projections + 4 FFNs x 3 + 3 gates + 1 eh_proj + 3 expert layers
    assert (fp8, layers) == (4 * 4 + 4 * 3 + 1 + 3, 4 * 4 + 4 * 3 + 3 + 1 + 3)
    names = {name for name, m in model.named_modules() if getattr(m, "fp8", False)}
    assert "mtp.0.eh_proj" in names and "layers.0.attn.wq" in names
    assert not any(name.endswith("shared_gate") for name in names)
    assert not isinstance(model.output, Linear) and isinstance(model.mtp[0], MTPModule)
    assert "layers.1.ffn.experts" in names and "layers.0.ffn.w_gate" in names
    assert model.set_fp8("none") == (0, layers)
    assert not any(getattr(m, "fp8", False) for m in model.modules())
    with pytest.raises(ValueError, match="train.fp8='blockwise': use one of none, rowwise"):
        model.set_fp8("blockwise")


def test_a_model_trained_in_fp8_follows_the_float32_one() -> None:
    """Ten AdamW steps of the same model on one batch: the FP8 run's losses stay within 0.5% of float32's (and
    differ: its GEMMs are not float32's), and both learn the batch."""
    losses = {}
    for recipe in ("none", "rowwise"):
        torch.manual_seed(0)
        model = _model()
        model.set_fp8(recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
        losses[recipe] = []
        for _ in range(10):
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits_BTV.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            (loss + out.aux_loss).backward()
            opt.step()
            losses[recipe].append(loss.item())
    plain, fp8 = torch.tensor(losses["none"]), torch.tensor(losses["rowwise"])
    assert not torch.equal(plain, fp8)
    assert torch.allclose(fp8, plain, rtol=0.005), (plain, fp8)
    assert fp8[-1] < fp8[0] - 0.5 and plain[-1] < plain[0] - 0.5


def test_fp8_is_refused_by_name_where_it_cannot_run(monkeypatch) -> None:
    gpu = torch.device("cuda")
    assert "return bfloat16, not torch.float32" in float8_unsupported(gpu, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "(sm80) has no FP8 tensor cores" in float8_unsupported(gpu, torch.bfloat16)
    assert float8_unsupported(torch.device("cpu"), torch.float32) is None

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_scaled_mm' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    with pytest.raises(ValueError, match=r"train.fp8=rowwise cannot run here: torch .* has no row-wise scaled GEMM "
                                         r"here \(Could not run 'aten::_scaled_mm'.*Set train.fp8=none"):
        _check_fp8("rowwise", torch.device("cpu"), torch.float32)
    _check_fp8("none", torch.device("cpu"), torch.float32)  # nothing to refuse: no GEMM tried


def _experts_run(recompute: str, bias: bool, fp8: bool, order: bool, compute: str = "loop",
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Output and every gradient of one expert layer (4 experts, one with no rows) on fixed rows."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 48, compute=compute, recompute=recompute, bias=bias,
                             activation=ExpertActivation("swiglu_clamped" if bias else "swiglu")).to(device)
    for w in experts.weights:
        torch.nn.init.normal_(w, std=0.2)
    experts.fp8 = fp8
    x = torch.randn(40, 32, device=device, requires_grad=True)
    rows, dy = [13, 0, 19, 8], torch.randn(40, 32, device=device)
    perm = torch.randperm(40, device=device) if order else None
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        y = experts(x, rows if compute == "loop" else torch.tensor(rows, device=device), order=perm)
    y.float().backward(dy)
    return [y.detach().float(), x.grad, *(w.grad for w in experts.weights)]


@pytest.mark.parametrize("bias", [False, True], ids=["swiglu", "gpt-oss-biased-clamped"])
@pytest.mark.parametrize("order", [False, True], ids=["grouped-rows", "received-rows"])
def test_fp8_experts_follow_the_plain_ones_and_recompute_the_same(bias: bool, order: bool) -> None:
    """The expert loop in FP8: output and input gradient within e4m3's rounding of float32's (two GEMMs in a
    row, each a few percent: 10%) and not equal to them, weight gradients (computed in float32 from FP8
    activations) as close; recomputing the expert MLPs in backward (full, selective) gives the same numbers
    bit for bit."""
    plain = _experts_run("none", bias, False, order)
    fp8 = _experts_run("none", bias, True, order)
    for name, got, want in zip(("output", "input", "gate", "up", "down", "b_gate", "b_up", "b_down"), fp8, plain):
        assert _relative(got, want) < 0.1, name
    assert _relative(fp8[0], plain[0]) > 1e-3 and _relative(fp8[1], plain[1]) > 1e-3
    for recompute in ("full", "selective"):
        for got, want in zip(_experts_run(recompute, bias, True, order), fp8):
            assert torch.equal(got, want), recompute


def test_the_fp8_grouped_gemm_is_refused_where_it_has_no_kernel() -> None:
    experts = GroupedExperts(4, 32, 48, compute="grouped_mm")
    experts.fp8 = True
    with pytest.raises(ValueError, match="grouped_mm cannot run here: torch .* has no CPU kernel for the FP8 "
                                         r"grouped GEMM \(torch._scaled_grouped_mm\)"):
        experts.uses_grouped_mm(torch.ones(2, 32))
    experts.compute = "auto"
    assert not experts.uses_grouped_mm(torch.ones(2, 32))  # the loop runs FP8 instead
    assert "runs on sm90 GPUs, this one is sm100" in float8_grouped_unsupported(torch.ones(1), capability=(10, 0))
    assert float8_grouped_unsupported(torch.ones(1), capability=(9, 0)) is None


def _no_sm90() -> str | None:
    if not torch.cuda.is_available():
        return "needs a GPU (benchmarks/gpu_check.sh runs it)"
    return float8_grouped_unsupported(torch.ones(1, device="cuda"))


@pytest.mark.skipif(_no_sm90() is not None, reason=str(_no_sm90()))
def test_the_fp8_grouped_gemm_on_gpu_computes_what_the_fp8_loop_does() -> None:
    """GPU only (never run here): torch._scaled_grouped_mm's experts against the FP8 loop's, bf16 autocast."""
    loop = _experts_run("none", False, True, True, "loop", "cuda", torch.bfloat16)
    grouped = _experts_run("none", False, True, True, "grouped_mm", "cuda", torch.bfloat16)
    for got, want in zip(grouped, loop):
        assert _relative(got.float(), want.float()) < 0.02


@pytest.mark.skipif(_no_sm90() is not None, reason=str(_no_sm90()))
def test_the_fp8_grouped_gemm_on_gpu_casts_each_weight_once_a_pass(monkeypatch) -> None:
    """GPU only (never run here): the grouped FP8 path under shared_weight_casts, as the pipelined exchange
    runs it: two chunks' forwards cast the three stacked weights once (3 casts, not 6), and two chunks'
    backwards, run from an autograd Function's backward on the device's autograd thread, cast their other
    orientation once more (3)."""
    experts = GroupedExperts(4, 64, 64, compute="grouped_mm").cuda()
    for w in experts.weights:
        torch.nn.init.normal_(w, std=0.1)
    experts.fp8 = True
    leaves = [w.detach().bfloat16().requires_grad_() for w in experts.weights]
    storages = {w.untyped_storage().data_ptr() for w in leaves}
    casts, quantize_rows = [0], float8.quantize_rows

    def counting(t: torch.Tensor):
        casts[0] += t.untyped_storage().data_ptr() in storages
        return quantize_rows(t)

    monkeypatch.setattr(float8, "quantize_rows", counting)
    counts = torch.tensor([16, 32, 0, 16], device="cuda")
    xs = [torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    with shared_weight_casts(leaves):
        ys = [experts.forward_with(x, counts, *leaves) for x in xs]
    assert casts == [3]

    class _Chunks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, anchor: torch.Tensor) -> torch.Tensor:
            return anchor.clone()

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            with shared_weight_casts(leaves):
                for x, y in zip(xs, ys):
                    torch.autograd.grad(y, [x, *leaves], torch.ones_like(y))
            return grad

    anchor = torch.zeros(1, device="cuda", requires_grad=True)
    _Chunks.apply(anchor).sum().backward()
    assert casts == [6]


def _no_fp8_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "needs a GPU (benchmarks/gpu_check.sh runs it)"
    return float8_unsupported(torch.device("cuda"), torch.bfloat16)


@pytest.mark.skipif(_no_fp8_gpu() is not None, reason=str(_no_fp8_gpu()))
def test_fp8_linear_on_gpu_follows_the_plain_one() -> None:
    """GPU only (never run here): cuBLAS's row-wise scaled GEMM under bf16 autocast, forward and backward,
    against float32 on the same device."""
    torch.manual_seed(0)
    lin = Linear(256, 128).cuda()
    lin.fp8 = True
    x, dy = torch.randn(4, 64, 256, device="cuda", requires_grad=True), torch.randn(4, 64, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lin(x)
    y.float().backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    F.linear(x2, w2, lin.bias.detach()).backward(dy)
    assert y.dtype == torch.bfloat16
    for got, want in ((y.float(), F.linear(x2, w2, lin.bias.detach())), (x.grad, x2.grad), (lin.weight.grad, w2.grad)):
        assert _relative(got.float(), want) < 0.08


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_recompute_keeps_the_fp8_gemms() -> None:
    """train.recompute=selective keeps GEMM outputs, the scaled ones too: a SwiGLU FFN's backward runs its
    three layers' input- and weight-gradient GEMMs in FP8 (6), none of its forward GEMMs again."""
    ffn = SwiGLU(32, 64)
    for m in ffn.modules():
        if isinstance(m, Linear):
            m.fp8 = True
    ffn.selective = True
    y = ffn(torch.randn(4, 32, requires_grad=True))
    with _CountOps() as ops:
        y.sum().backward()
    assert ops.counts.get(torch.ops.aten._scaled_mm.default) == 6, ops.counts


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


@pytest.mark.usefixtures("no_grad")
def test_weight_casts_are_shared_within_a_scope_and_only_for_its_weights() -> None:
    """shared_weight_casts: a view of one of the scope's weights quantized once per orientation (the same
    tensors back), cast again after an in-place change; never shared outside a scope, for a weight the scope
    was not opened for, or for a temporary (a cast made per call). Called without a graph, as inside the
    GEMMs' autograd Functions."""
    w, other = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(32, 16))
    assert quantize_weight(w)[0] is not quantize_weight(w)[0]  # no scope: cast every time
    with shared_weight_casts([w]):
        first8, first_scale = quantize_weight(w)
        with shared_weight_casts([other]):  # a nested scope adds its weights to the outer one's
            assert quantize_weight(w)[0] is first8 and quantize_weight(w)[1] is first_scale
            assert quantize_weight(other)[0] is quantize_weight(other)[0]
        assert quantize_weight(other)[0] is not quantize_weight(other)[0]  # its scope closed
        assert quantize_weight(w.t())[0] is not first8  # the other orientation is a cast of its own
        assert quantize_weight(w.t())[0] is quantize_weight(w.t())[0]
        assert quantize_weight(w[1:])[0] is quantize_weight(w[1:])[0]  # a view of it (one expert's weight)
        temporary = w.detach() * 1.0  # not the scope's weight: never held
        assert quantize_weight(temporary)[0] is not quantize_weight(temporary)[0]
        w.mul_(4.0)
        again8, again_scale = quantize_weight(w)
        assert again8 is not first8 and torch.equal(again_scale, first_scale * 4.0)
        assert torch.equal(again8.float(), first8.float())  # the power-of-two scale took the whole change
    assert quantize_weight(w)[0] is not quantize_weight(w)[0]  # the scope closed: nothing held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_arrive_as_the_values_the_fp8_gemm_would_multiply(dtype: torch.dtype) -> None:
    """train.fp8_dispatch's wire format: D e4m3 bytes and a 4-byte scale a row; unpacked, each row is exactly
    its e4m3 rounding (rows from 1e-30 to 1e30 and an all-zero one), and quantizing it again gives the same
    values, so the experts' FP8 GEMMs multiply what they would have without the trip."""
    torch.manual_seed(0)
    x = (torch.randn(300, 64) * torch.logspace(-30, 30, 300)[:, None]).to(dtype)
    x[5] = 0
    packed = pack_rows(x)
    assert packed.dtype == torch.uint8 and packed.shape == (300, 64 + 4)
    rows = unpack_rows(packed, dtype)
    x8, scale = quantize_rows(x)
    assert rows.dtype == dtype and torch.equal(rows.float(), x8.float() * scale)
    again8, again_scale = quantize_rows(rows)
    assert torch.equal(again8.float() * again_scale, x8.float() * scale)
    assert not torch.equal(rows, x)  # rounded: the weight gradients see this
