"""parallel.layers_per_stage from the cost and memory models: the pipeline split whose slowest rank is the
fastest, every rank within the memory per rank.

An even split leaves DeepSeek-V3's first rank with three dense blocks and its last with an MTP depth, the
output layer over a 129k vocabulary and the loss: on 16 stages of 256 H100s the memory model put the last
rank 16 GB above the middle ones and the first 40 GB below, so layouts that fit on average did not fit. Here
each rank's time is the cost model's step for exactly its blocks (with the embedding on the first, the MTP
depths, output layer and loss on the last: what _predict_pipeline takes the slowest of), and its memory
the memory model's. The search is the bottleneck partition: for a time T, fill ranks in order with as many blocks as fit
within T and the memory (a rank that takes fewer never helps the ranks after it, whose work only grows with
the blocks left), and bisect T. A looped rank (stages_per_rank V) is weighed as its V stages together, as
the cost and memory models weigh it, and its blocks split as evenly as can be over its stages. Stages placed in
a V (zbv_zero_bubble, dualpipev: rank r holds stages r and 2 pp - 1 - r) are split by a local search instead
(_balance_v).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from moeyard.parallel.plan import Plan, ReduceOnce
from moeyard.parallel.stages import rank_split, stage_layers
from moeyard.trainer.config.sections import Config
from moeyard.trainer.scheduler.cost_model import Costs, Workload, stage_prediction
from moeyard.trainer.scheduler.memory_model import Layout, block_counts, count_parameters, predict_stage

PRECISION = 1e-4
"""The bisection stops within this share of the slowest rank's time: far below the cost model's precision."""


def _reduce_variants(plan: Plan, layout: Layout) -> tuple[bool, tuple[ReduceOnce, ...]]:
    """(whether each rank chooses, the choices): fsdp resident weights may reduce once on a rank instead;
    reducing once accumulates the unsharded gradients in reduce_dtype, so it is weighed with float32
    reduction only (as run_planning.layout_choices weighs it)."""
    choose = plan.grad_sync == "fsdp" and plan.gather_once and plan.reduce_once is False and layout.reduce_bytes == 4
    return choose, (True, False) if choose else (plan.reduce_once,)


@dataclass(frozen=True)
class StageSplit:
    """What balance_stages chose."""

    layers_per_stage: tuple[int, ...]
    reduce_once: ReduceOnce
    """fsdp resident weights: each rank's choice (parallel.fsdp_reduce_once); else the plan's, unchanged."""


def balance_stages(cfg: Config, w: Workload, plan: Plan, costs: Costs, layout: Layout,
                   capacity_bytes: float) -> Optional[StageSplit]:
    """parallel.layers_per_stage for run `cfg` (pp > 1) with workload `w` and `plan` on memory layout `layout`:
    the split with the smallest predicted slowest rank among those whose every rank's peak is within
    `capacity_bytes`; None where no split fits. With fsdp resident weights (gathered once, reduced every
    micro-step) each rank reduces once instead wherever that fits its memory and is not slower: the first and
    last ranks, whose embedding, dense blocks or output layer have many gradients to reduce and few experts to
    hold, and any other with room."""
    if cfg.v_shape:
        return _balance_v(cfg, w, plan, costs, layout, capacity_bytes)
    pp, per_rank, n = cfg.parallel.pp, cfg.stages_per_rank, cfg.model.n_layers
    blocks = block_counts(cfg.model, layout.ep, layout.frozen)
    # a last stage of no block, where it trains alone (one stage a rank: a looped rank spreads its blocks)
    alone = count_parameters(cfg.model, layout.ep, layout.frozen, pp - 1, pp, 1, (*_even(n, pp - 1), 0), blocks) \
        if per_rank == 1 else None
    empty_last = alone is not None and alone.dense_trainable + alone.experts_trainable > 0
    per_rank_choice, variants = _reduce_variants(plan, layout)
    seen: dict = {}  # stage_prediction's, by what a stage runs
    timed: dict[tuple, float] = {}

    def rank_s(r: int, start: int, count: int, once: ReduceOnce) -> float:
        """The cost model's step of rank r holding `count` blocks from `start` (the first rank also the
        embedding, the last the MTP depths, output layer and loss), as _predict_pipeline predicts it."""
        if (r, start, count, once) not in timed:
            held = range(start, w.n_layers if r == pp - 1 else start + count)
            timed[r, start, count, once] = stage_prediction(w, dataclasses.replace(plan, reduce_once=once), costs,
                                                            held, r, pp, seen).step
        return timed[r, start, count, once]

    fitted: dict[tuple, bool] = {}  # (rank, first block, blocks, reduce once): each bisection asks again

    def fits(totals: list[int], r: int, once: ReduceOnce) -> bool:
        key = (r, sum(totals[:r]), totals[r], once)
        if key not in fitted:
            sizes = tuple(rank_split(totals, per_rank))
            mem = dataclasses.replace(layout, layers_per_stage=sizes, reduce_once=once)
            counts = count_parameters(cfg.model, layout.ep, layout.frozen, r, pp, per_rank, sizes, blocks)
            fitted[key] = predict_stage(cfg.model, mem, counts, r).total <= capacity_bytes
        return fitted[key]

    def best(totals: list[int], r: int) -> Optional[tuple[float, ReduceOnce]]:
        """Rank r's fastest variant that fits, with its time; None: none fits."""
        timings = [(rank_s(r, sum(totals[:r]), totals[r], once), once) for once in variants if fits(totals, r, once)]
        return min(timings, key=lambda t: t[0]) if timings else None

    def fill(limit_s: float) -> Optional[tuple[list[int], list[ReduceOnce]]]:
        """The ranks' block counts, each rank taking as many as fit `limit_s` and the memory, and each rank's
        variant; None: none."""
        totals: list[int] = []
        chosen: list[ReduceOnce] = []
        start = 0
        for r in range(pp - 1):
            left_after = per_rank * (pp - 1 - r) - empty_last  # blocks the later ranks need at the least
            count, variant = 0, variants[0]
            for k in range(per_rank, n - start - left_after + 1):
                # the later ranks as evenly as can be: only rank r's blocks decide its memory
                trial = totals + [k] + _even(n - start - k, pp - 1 - r)
                option = best(trial, r)
                if option is None or option[0] > limit_s:
                    break
                count, variant = k, option[1]
            if not count:
                return None
            totals.append(count)
            chosen.append(variant)
            start += count
        totals.append(n - start)
        option = best(totals, pp - 1)
        if option is None or option[0] > limit_s:
            return None
        return totals, chosen + [option[1]]

    found = fill(float("inf"))  # the memory alone
    if found is None:
        return None
    starts = [sum(found[0][:r]) for r in range(pp)]
    low, high = 0.0, max(rank_s(r, starts[r], found[0][r], found[1][r]) for r in range(pp))
    while high - low > PRECISION * high:
        middle = (low + high) / 2
        trial = fill(middle)
        if trial is None:
            low = middle
        else:
            high, found = middle, trial
    totals, once = found
    return StageSplit(tuple(rank_split(totals, per_rank)),
                      tuple(bool(o) for o in once) if per_rank_choice else plan.reduce_once)


def _even(blocks: int, ranks: int) -> list[int]:
    """`blocks` over `ranks` ranks of one stage as evenly as can be (stage_layers), the last taking none where
    there is one block fewer than ranks."""
    if blocks < ranks:
        return [1] * blocks + [0]
    return [len(s) for s in stage_layers(blocks, ranks)]


def _balance_v(cfg: Config, w: Workload, plan: Plan, costs: Costs, layout: Layout,
               capacity_bytes: float) -> Optional[StageSplit]:
    """balance_stages for stages placed in a V (rank r holds stages r and 2 pp - 1 - r): from the even split,
    move one block at a time across a stage boundary, taking it from a stage of the worst rank, while that
    lowers first the bytes by which ranks exceed the memory, then the slowest rank's time (a rank's time and
    peak as balance_stages weighs them, its two stages' blocks exactly). A local search: a V's rank holds two
    runs of blocks at both ends of the model, which filling ranks in order cannot split. None: no split it
    reaches fits."""
    pp, n = cfg.parallel.pp, cfg.model.n_layers
    stages = 2 * pp
    blocks = block_counts(cfg.model, layout.ep, layout.frozen)
    per_rank_choice, variants = _reduce_variants(plan, layout)
    seen: dict = {}
    memo: dict[tuple, tuple[float, float, ReduceOnce]] = {}

    def rank_of(stage: int) -> int:
        return stage if stage < pp else stages - 1 - stage

    def weigh(sizes: tuple[int, ...], r: int) -> tuple[float, float, ReduceOnce]:
        """Rank r's (bytes over the memory, time, variant): its fastest variant that fits, else the one over
        by the least."""
        spans = stage_layers(n, stages, sizes)
        held = (*spans[r], *spans[stages - 1 - r])
        down, up = spans[r], spans[stages - 1 - r]
        key = (down.start, down.stop, up.start, up.stop, r)  # each stage's blocks: the memory weighs them apart
        if key not in memo:
            options = []
            counts = count_parameters(cfg.model, layout.ep, layout.frozen, r, pp, 2, sizes, blocks, True)
            for once in variants:
                mem = dataclasses.replace(layout, layers_per_stage=sizes, reduce_once=once)
                over = max(0.0, predict_stage(cfg.model, mem, counts, r).total - capacity_bytes)
                ran = (*held, *range(n, w.n_layers)) if r == 0 else held  # the MTP depths with the last stage
                seconds = stage_prediction(w, dataclasses.replace(plan, reduce_once=once), costs, ran, r, pp, seen).step
                options.append((over, seconds, once))
            memo[key] = min(options, key=lambda o: o[:2])
        return memo[key]

    def score(sizes: tuple[int, ...]) -> tuple[float, float, list]:
        ranks = [weigh(sizes, r) for r in range(pp)]
        return sum(o[0] for o in ranks), max(o[1] for o in ranks), ranks

    sizes = tuple(len(s) for s in stage_layers(n, stages))
    current = score(sizes)
    for _ in range(4 * n):  # each accepted move lowers the score
        worst = max(range(pp), key=lambda r: current[2][r][:2])
        moves = []
        for s in (worst, stages - 1 - worst):
            for t in (s - 1, s + 1):
                least = 0 if s == stages - 1 else 1  # the last stage may hold no block (stage_layers)
                if 0 <= t < stages and sizes[s] > least and rank_of(t) != worst:
                    moved = list(sizes)
                    moved[s] -= 1
                    moved[t] += 1
                    trial = score(tuple(moved))
                    if trial[:2] < current[:2]:
                        moves.append((trial[:2], tuple(moved), trial))
        if not moves:
            break
        _, sizes, current = min(moves, key=lambda m: m[0])
    if current[0] > 0:
        return None
    once = tuple(bool(o[2]) for o in current[2])
    return StageSplit(sizes, once if per_rank_choice else plan.reduce_once)
