"""Measure unit costs on the real process groups at the real shapes (the trainer caches them per machine).

What is timed (fastest of repeats, slowest rank, every rank taking part; the fastest because whatever
else runs on the machine only ever adds time, and a two-point fit must not see the noise as its slope):
  dense       the model's forward / backward with the routed experts skipped
              (attention, norms, router, permutation, shared experts, MTP depths, heads, loss)
  experts     this rank's experts, forward and backward, at two row counts
              (fit: latency + rows x time per row)
  all-to-all  over the ep group (and, where it spans machines, inside one and across
              them: hierarchical dispatch's two stages), and all-reduce / reduce-scatter /
              all-gather over dp and edp, at two sizes (fit: alpha + bytes / beta)
  optimizer   one AdamW step over this rank's parameters
  overlap     experts with an all-to-all running beside them, against each alone
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models import GroupedExperts, ModelConfig, build_model
from moeyard.models.moe.layer import ExpertRows, PendingSum
from moeyard.parallel.exchange.dispatch import ExpertParallelExchange
from moeyard.parallel.grads.buckets import all_gather, reduce_scatter
from moeyard.parallel.mesh import ParallelMesh
from moeyard.parallel.parallelize import apply_expert_parallel
from moeyard.trainer.scheduler.cost_model import Phase, Workload, moe_layer_timeline
from moeyard.trainer.scheduler.measured_costs import Fit, MeasuredCosts, Profile, line, profile_from_dict
from moeyard.trainer.step import MicroBatch, forward_and_loss

PROFILER_VERSION = 7
"""Part of the cache key: bump when what is measured changes, so old profiles are not reused (7: under
train.fp8 the pipelined layer whose chunk overhead is measured shares its weight casts)."""

class _SkipExperts(ExpertRows):
    """Exchange stand-in that keeps the graph but does no expert work or communication."""

    def __init__(self, exchange) -> None:
        self.inner = exchange

    def run_experts(self, x_SD: Tensor, tokens_per_expert_E: Tensor, experts: GroupedExperts) -> Tensor:
        return x_SD * 0.0

    def sum_over_batch(self, counts: Tensor) -> PendingSum:
        return self.inner.sum_over_batch(counts)


class _Timer:
    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[..., object], group: dist.ProcessGroup | None = None,
                 setup: Callable[[], object] | None = None) -> float:
        """Fastest seconds of fn over repeats (after one warm-up), the slowest rank of `group`.

        With `setup`, its result is passed to fn and only fn is timed (e.g. backward after an untimed forward).
        """
        call = (lambda: fn(setup())) if setup is not None else fn
        call()
        samples = []
        for _ in range(self.repeats):
            arg = setup() if setup is not None else None
            if group is not None:
                dist.barrier(group=group)
            self._sync()
            start = time.perf_counter()
            fn(arg) if setup is not None else fn()
            self._sync()
            samples.append(time.perf_counter() - start)
        slowest = torch.tensor([min(samples)], dtype=torch.float64, device=self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest)


def profile_key(cfg: ModelConfig, w: Workload, device: torch.device) -> str:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}cpu-{torch.get_num_threads()}thr"
    world = [dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
             dist.get_backend()]
    trainable = sum(p.numel for p in w.params)  # frozen parameters change the optimizer's cost
    what = json.dumps([PROFILER_VERSION, hardware, world, torch.__version__, dataclasses.asdict(cfg), w.tokens,
                       w.seq_len, w.ep, w.dp, w.act_bytes, trainable, w.ranks_per_node, w.loss_chunk_tokens, w.fp8,
                       w.fp8_experts],
                      sort_keys=True, default=str)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def measure(cfg: ModelConfig, w: Workload, pmesh: ParallelMesh, device: torch.device, dtype: torch.dtype,
            repeats: int = 5) -> Profile:
    """Collective: every rank runs the same measurements."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(cfg, w, pmesh, device, dtype, repeats)  # leaves the training RNG streams untouched


def _in_dtype(fn: Callable[..., object], device: torch.device, dtype: torch.dtype) -> Callable[..., object]:
    """fn under the training autocast, so the work is timed in the dtype it trains in."""
    if dtype == torch.float32:
        return fn

    def wrapped(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args, **kwargs)
    return wrapped


def _even_split(rows: int, experts: int) -> list[int]:
    return [rows // experts + (1 if i < rows % experts else 0) for i in range(experts)]


def _fit_rows(points: list[tuple[int, float]]) -> Fit:
    (x1, t1), (x2, t2) = points
    return line(x1, t1, x2, t2) if x2 != x1 else (t2, 0.0)


def _dense_times(cfg: ModelConfig, w: Workload, pmesh: ParallelMesh, device: torch.device, dtype: torch.dtype,
                 timer: _Timer) -> tuple[float, float]:
    """Forward and backward seconds of the real model with the expert work skipped."""
    tokens_BT = torch.randint(0, cfg.vocab_size, (max(1, w.tokens // w.seq_len), w.seq_len + 1), device=device)
    with torch.device("meta"):  # this rank's part only: built empty, sharded, then given memory
        model = build_model(cfg)
    apply_expert_parallel(model, pmesh)
    model.set_fp8("rowwise" if w.fp8 else "none")  # timed as it trains (train.fp8)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # values only need to be ordinary numbers (no denormals) for the timing
        for p in model.parameters():
            p.normal_(0.0, cfg.init_std, generator=generator)
    for _, moe in model.moe_layers():
        moe.exchange = _SkipExperts(moe.exchange)

    def forward() -> Tensor:  # the training step's own forward and losses (MTP depths, chunked loss included)
        loss = forward_and_loss(model, MicroBatch(tokens_BT), dtype, w.loss_chunk_tokens, mtp=True)
        return loss.lm_sum + loss.router_loss + (loss.mtp_sum if loss.mtp_sum is not None else 0.0)

    return timer(lambda: forward().item()), timer(lambda loss: loss.backward(), setup=forward)


def _expert_fits(cfg: ModelConfig, experts: GroupedExperts, rows_real: int, device: torch.device,
                 dtype: torch.dtype, timer: _Timer) -> tuple[Fit, Fit]:
    """This rank's expert shard at a quarter of the real row count and the real count (pipelined chunks run
    fewer rows than a whole layer), rows spread evenly over its experts: forward and backward lines."""
    local = experts.w_gate_EDF.shape[0]
    points: dict[Phase, list[tuple[int, float]]] = {"fwd": [], "bwd": []}
    for rows in (max(local, rows_real // 4), rows_real):
        x = torch.randn(rows, cfg.dim, device=device, requires_grad=True)
        split = _even_split(rows, local)
        dy = torch.randn(rows, cfg.dim, device=device)
        points["fwd"].append((rows, timer(_in_dtype(lambda: experts(x, split).sum().item(), device, dtype))))
        points["bwd"].append((rows, timer(lambda y: y.backward(dy.to(y.dtype)),
                                          setup=_in_dtype(lambda: experts(x, split), device, dtype))))
    return _fit_rows(points["fwd"]), _fit_rows(points["bwd"])


def _a2a_seconds(nbytes: int, w: Workload, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 timer: _Timer) -> float:
    size = dist.get_world_size(group)
    n = max(size, nbytes // w.act_bytes // size * size)
    buf = torch.empty(n, dtype=dtype if w.act_bytes == 2 else torch.float32, device=device)
    out = torch.empty_like(buf)
    return timer(lambda: dist.all_to_all_single(out, buf, group=group), group)


def _a2a_fit(nbytes: int, w: Workload, group: Optional[dist.ProcessGroup], device: torch.device, dtype: torch.dtype,
             timer: _Timer) -> Fit:
    """all_to_all_single on `group` at nbytes / 8 and nbytes (bytes one rank sends in all); (0, 0) for none."""
    if group is None or dist.get_world_size(group) == 1:
        return 0.0, 0.0
    return line(nbytes / 8, _a2a_seconds(nbytes // 8, w, group, device, dtype, timer), nbytes,
                 _a2a_seconds(nbytes, w, group, device, dtype, timer))


def _collective_fit(kind: str, group: dist.ProcessGroup, device: torch.device, timer: _Timer) -> Fit:
    """all_reduce, reduce_scatter or all_gather of fp32 gradients on `group`, at two sizes."""
    size = dist.get_world_size(group)
    if size == 1:
        return 0.0, 0.0
    times = []
    for nbytes in (1 << 18, 1 << 23):
        n = nbytes // 4 // size * size
        full = torch.zeros(n, device=device)
        shard = torch.zeros(n // size, device=device)
        if kind == "all_reduce":
            fn = lambda: dist.all_reduce(full, group=group)  # noqa: E731
        elif kind == "reduce_scatter":
            fn = lambda: reduce_scatter(shard, full, group=group)  # noqa: E731
        else:
            fn = lambda: all_gather(full, shard, group=group)  # noqa: E731
        times.append(timer(fn, group))
    return line(1 << 18, times[0], 1 << 23, times[1])


def _optimizer_seconds(w: Workload, device: torch.device, timer: _Timer) -> float:
    """AdamW over a slice of at most 16 M parameters, scaled to what this rank holds (element-wise work is
    linear in the count; a full-size copy could not fit beside a large model)."""
    numel = sum(p.numel for p in w.params)
    probe = min(numel, 1 << 24)
    flat = torch.nn.Parameter(torch.zeros(probe, device=device))
    flat.grad = torch.randn(probe, device=device)
    return timer(torch.optim.AdamW([flat], lr=1e-3).step) * numel / probe


def _overlap_slowdown(experts: GroupedExperts, rows_real: int, a2a_bytes: int, w: Workload, pmesh: ParallelMesh,
                      device: torch.device, dtype: torch.dtype, timer: _Timer) -> float:
    """Experts at full rows with a full-size all-to-all beside them: how much both slow down together."""
    x = torch.randn(rows_real, w.dim, device=device)
    split = _even_split(rows_real, experts.w_gate_EDF.shape[0])
    n = max(pmesh.ep, a2a_bytes // w.act_bytes // pmesh.ep * pmesh.ep)
    buf = torch.empty(n, device=device, dtype=torch.float32 if w.act_bytes == 4 else dtype)
    out = torch.empty_like(buf)

    @functools.partial(_in_dtype, device=device, dtype=dtype)
    def compute() -> None:
        with torch.no_grad():
            experts(x, split)

    def together() -> None:
        work = dist.all_to_all_single(out, buf, group=pmesh.ep_group, async_op=True)
        compute()
        work.wait()

    t_c = timer(compute)
    t_a = _a2a_seconds(a2a_bytes, w, pmesh.ep_group, device, dtype, timer)
    t_both = timer(together, pmesh.ep_group)
    short, long = sorted((t_a, t_c))
    # Both slowed by s while together: t_both = s * short + (long - short).
    return max(1.0, (t_both - long + short) / short) if short > 0 else 1.0


def _measure(cfg: ModelConfig, w: Workload, pmesh: ParallelMesh, device: torch.device, dtype: torch.dtype,
             repeats: int) -> Profile:
    timer = _Timer(device, repeats)
    dense_fwd, dense_bwd = _dense_times(cfg, w, pmesh, device, dtype, timer)
    local = cfg.moe.num_experts // pmesh.ep
    experts = GroupedExperts(local, cfg.dim, cfg.moe.ffn_dim, cfg.moe.expert_compute,
                             recompute="full" if cfg.moe.recompute_experts else "none").to(device)
    experts.fp8 = w.fp8_experts
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    rows_real = max(local, w.routed_rows)
    experts_fwd, experts_bwd = _expert_fits(cfg, experts, rows_real, device, dtype, timer)
    # Communication: two sizes each, on the groups training uses.
    a2a_hi = max(4096, int(rows_real * cfg.dim * w.act_bytes))
    a2a_fit = _a2a_fit(a2a_hi, w, pmesh.ep_group, device, dtype, timer)
    staged = {"all_to_all_node": _a2a_fit(a2a_hi, w, pmesh.node_group, device, dtype, timer),
              "all_to_all_cross": _a2a_fit(a2a_hi, w, pmesh.cross_group, device, dtype, timer)}
    fits = {f"{kind}_{name}": _collective_fit(kind, group, device, timer)
            for kind in ("all_reduce", "reduce_scatter", "all_gather")
            for name, group in (("dp", pmesh.dp_group), ("edp", pmesh.edp_group))}
    optimizer_s = _optimizer_seconds(w, device, timer)
    slowdown = (_overlap_slowdown(experts, rows_real, a2a_hi, w, pmesh, device, dtype, timer)
                if pmesh.ep > 1 else 1.0)
    parts = Profile(key="", dense_fwd_s=dense_fwd, dense_bwd_s=dense_bwd, experts_fwd=experts_fwd,
                    experts_bwd=experts_bwd, all_to_all=a2a_fit, optimizer_s=optimizer_s, overlap_slowdown=slowdown,
                    **fits, **staged)
    if pmesh.ep == 1:
        return parts
    in_dtype = functools.partial(_in_dtype, device=device, dtype=dtype)
    return dataclasses.replace(parts, chunk_overhead_s=_chunk_overhead(parts, w, pmesh, experts, timer, in_dtype))


def _chunk_overhead(parts: Profile, w: Workload, pmesh: ParallelMesh, experts: GroupedExperts, timer: "_Timer",
                    in_dtype: Callable) -> float:
    """Run the real pipelined layer at r=1, 2, 4 and charge what the parts do not explain to the chunks.

    Small collectives cost more inside a pipeline than in isolation (ranks arrive
    at different times; with more ranks than cores each wait is a context switch),
    and each chunk pays Python and launch costs. Measuring the executor itself
    keeps the planner from choosing chunks that only look free.
    """
    device = next(experts.parameters()).device
    E = w.num_experts
    rows = max(E, w.routed_rows // E * E)
    counts = torch.full((E,), rows // E, dtype=torch.int64, device=device)
    x = torch.randn(rows, w.dim, device=device, requires_grad=True)
    dy = torch.randn(rows, w.dim, device=device)

    def layer(chunks: int) -> float:
        exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group, chunks)
        run = in_dtype(lambda: exchange.run_experts(x, counts, experts))
        return timer(lambda: (run().float() * dy).sum().backward(), pmesh.ep_group)

    layer_w = dataclasses.replace(w, tokens=rows // w.top_k)
    costs = MeasuredCosts(parts)
    base_measured = layer(1)
    base_modelled = moe_layer_timeline(layer_w, costs, 1).makespan
    # Least squares through the origin: extra_measured - extra_modelled = overhead * (chunks beyond the first,
    # summed over the forward and backward passes).
    num = den = 0.0
    for r in (2, 4):
        unexplained = (layer(r) - base_measured) - (moe_layer_timeline(layer_w, costs, r).makespan - base_modelled)
        extra_chunks = 2 * (r - 1)
        num += unexplained * extra_chunks
        den += extra_chunks ** 2
    return max(0.0, num / den)


def measure_everywhere(cfg: ModelConfig, w: Workload, pmesh: ParallelMesh, device: torch.device,
                       dtype: torch.dtype, key: str) -> Profile:
    """Measure on every rank (collective) and return rank 0's numbers on all, so every rank plans alike."""
    profile = dataclasses.replace(measure(cfg, w, pmesh, device, dtype), key=key)
    box = [dataclasses.asdict(profile)]
    dist.broadcast_object_list(box, src=0)
    return profile_from_dict(box[0])
