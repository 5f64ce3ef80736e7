"""Predict stage and step times of a plan: shapes (Workload) x unit costs (Costs) -> simulator tasks.

Unit costs come from measurements on the real process groups (profile.MeasuredCosts) or from a hardware
description (hardware.HardwareCosts); the step is built the same way for both, so `moeyard plan
--hardware` predicts a cluster with the code that plans this machine.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Protocol, Sequence

from moeyard.models import ModelConfig
from moeyard.models.float8 import eligible, packed_width
from moeyard.parallel.plan import Plan
from moeyard.parallel.stages import holds_ends, rank_layers
from moeyard.trainer.scheduler.block_shapes import (
    attention_core_flops,
    block_elementwise_bytes,
    block_fwd_flops,
    block_index,
    fp8_linear_widths,
    head_fwd_flops,
    parameter_shapes,
)
from moeyard.trainer.scheduler.machines import expected_nodes_per_token, machine_bound
from moeyard.trainer.scheduler.simulator import Schedule, Timeline

Phase = Literal["fwd", "bwd"]


@dataclass(frozen=True)
class ParamInfo:
    layer: int
    """Block index; -1 for the embedding, n_layers for the final norm and output head."""
    numel: int
    expert: bool


@dataclass(frozen=True)
class Workload:
    """What one rank does in one step, in shapes."""

    tokens: int
    """Tokens per rank per micro-step."""
    seq_len: int
    dim: int
    expert_hidden: int
    num_experts: int
    top_k: int
    n_layers: int
    """Blocks that run one after another: the decoder's, then the MTP depths' (model.n_blocks)."""
    moe_layers: tuple[int, ...]
    ep: int
    dp: int
    micro_steps: int
    params: tuple[ParamInfo, ...]
    """Parameters of this rank in backward order (the order gradient buckets use)."""
    act_bytes: int = 4
    """Bytes per activation element crossing the all-to-all."""
    grad_bytes: int = 4
    """Bytes per gradient element in the reduction (parallel.reduce_dtype)."""
    moment_bytes: int = 4
    """Bytes per AdamW moment element (optim.moment_dtype)."""
    dense_flops: tuple[float, ...] = ()
    """Forward FLOPs of each block without its routed experts."""
    head_flops: float = 0.0
    """Forward FLOPs of the output head."""
    attention_flops: tuple[float, ...] = ()
    """The part of each block's dense_flops that is attention's scores and weighted sum (not GEMMs with a
    weight: flash-attention kernels run them at their own rate)."""
    elementwise_bytes: tuple[float, ...] = ()
    """Bytes each block's forward moves in memory-bound kernels: norms, residual adds, RoPE, the SwiGLU
    product, permuting rows to experts and combining them back."""
    fp8_linears: tuple[tuple[tuple[int, int], ...], ...] = ()
    """train.fp8: (input, output) widths of each block's linear layers that multiply in FP8 (their FLOPs are
    part of dense_flops); (): none do."""
    fp8_experts: bool = False
    """train.fp8: the routed experts' forward and input-gradient GEMMs in FP8, weight gradients not."""
    fp8_dispatch: bool = False
    """train.fp8_dispatch: the forward dispatch sends each row as e4m3 bytes and a float32 scale (flat)."""
    recompute: str = "none"
    """train.recompute: full runs every block's forward again in backward (its all-to-alls too); experts
    runs the expert MLPs' forward again; selective, attention's core and the memory-bound kernels."""
    recompute_experts: bool = False
    """model.moe.recompute_experts: the expert MLPs run their forward again whatever `recompute` says."""
    ranks_per_node: int = 0
    """Ranks per machine; 0: every rank of the ep group on one machine."""
    loss_chunk_tokens: int = 0
    """train.loss_chunk_tokens: the output layer and loss run this many tokens at a time (0: all at once)."""
    nodes_per_token: float = 1.0
    """Machines of the ep group a token's copies reach, on average (`expected_nodes_per_token`)."""
    pp: int = 1
    """Pipeline stages (parallel.pp): `dp` ranks hold each stage; predict() runs the stages' workloads."""
    mtp_blocks: int = 0
    """The last `mtp_blocks` of the n_layers blocks are MTP depths (on the last pipeline stage)."""
    stages_per_rank: int = 1
    """Pipeline stages on each rank (interleaved_1f1b, looped_bfs, interleaved_zero_bubble): the bubble is that
    many times shorter."""
    layers_per_stage: tuple[int, ...] = ()
    """parallel.layers_per_stage: decoder blocks of each of the pp x stages_per_rank stages; (): even."""
    v_shape: bool = False
    """Two stages a rank placed in a V (zbv_zero_bubble, dualpipev): the first rank holds both ends of the model.
    Their bubble is interleaved_1f1b's with two stages a rank, less what their weight steps fill
    (deferred_weight_steps; dualpipev's pairs: `overlapped`)."""
    deferred_weight_steps: bool = False
    """A schedule that runs each backward as an input step and a weight step, with the weight GEMMs in the weight
    steps (Config.defers_weight_gradients): where the gradient sync holds its reduction, they fill the bubble
    (_weight_step_s)."""
    stages_across_machines: bool = False
    """With pp > 1: neighbouring stages sit on different machines (activations cross the network)."""
    overlapped: bool = False
    """Two lanes (Config.lanes: overlapped_1f1b, dualpipev with replicated stages): steady-state forward and
    backward of two micro-batches side by side, each one's all-to-alls behind the other's compute
    (_hidden_by_lanes)."""
    model_flops_fwd: float = 0.0
    """Forward FLOPs of the whole model's blocks and head, where this is one pipeline stage's workload
    (stage_workload; 0: this is the whole model). A profile measured the whole model's dense time."""

    @cached_property
    def param_runs(self) -> tuple[tuple[int, tuple[ParamInfo, ...]], ...]:
        """`params` as runs of one block's, in order: stage_workload picks a stage's by block, not by parameter
        (the stage search asks for ~10^5 stages of a 671B model's ~10^3 parameters)."""
        runs: list[tuple[int, list[ParamInfo]]] = []
        for p in self.params:
            if not runs or runs[-1][0] != p.layer:
                runs.append((p.layer, []))
            runs[-1][1].append(p)
        return tuple((layer, tuple(run)) for layer, run in runs)

    def attention_flops_of(self, layer: int) -> float:
        """attention_flops of a block; 0 for the embedding and the head."""
        return self.attention_flops[layer] if 0 <= layer < len(self.attention_flops) else 0.0

    def fp8_linears_of(self, layer: int) -> tuple[tuple[int, int], ...]:
        """fp8_linears of a block; none for the embedding and the head."""
        return self.fp8_linears[layer] if 0 <= layer < len(self.fp8_linears) else ()

    @property
    def fp8(self) -> bool:
        return any(self.fp8_linears)

    def layer_flops(self, layer: int) -> float:
        """-1: embedding (a gather, ~0), n_layers: the output head."""
        if layer < 0:
            return 0.0
        return self.head_flops if layer == self.n_layers else self.dense_flops[layer]

    @property
    def routed_rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def a2a_bytes(self) -> float:
        """Bytes this rank sends in one dispatch (uniform routing: (ep-1)/ep of the copies leave)."""
        return self.routed_rows * self.dim * self.act_bytes * (self.ep - 1) / self.ep

    @property
    def fp8_dispatch_bytes(self) -> float:
        """a2a_bytes under train.fp8_dispatch: a byte an element and 4 a row (models/float8.py pack_rows)."""
        return self.routed_rows * packed_width(self.dim) * (self.ep - 1) / self.ep

    @property
    def ep_nodes(self) -> int:
        """Machines one ep group spans."""
        return self.ep // self.ranks_per_node if 0 < self.ranks_per_node < self.ep else 1

    def cross_node_bytes(self, dispatch: str) -> float:
        """Bytes one dispatch sends off this rank's machine: flat, every copy bound for another machine;
        hierarchical, one row per (token, other machine), packed with its copies' weights (float32 exact: 3
        columns each in 2-byte rows) and expert ids (the combine's partial sums come back without them;
        charged at the same size, a small overestimate)."""
        M = self.ep_nodes
        if dispatch == "flat":
            return self.routed_rows * (M - 1) / M * self.dim * self.act_bytes
        slots = min(self.top_k, self.num_experts // M)
        weight_columns = 1 if self.act_bytes >= 4 else 3  # parallel/exchange/hierarchical.weight_parts
        return (self.tokens * self.nodes_per_token * (M - 1) / M * (self.dim + (weight_columns + 1) * slots)
                * self.act_bytes)

    @property
    def in_node_bytes(self) -> float:
        """Bytes the fan-out inside a machine sends per dispatch under hierarchical dispatch."""
        G = min(self.ranks_per_node, self.ep)
        return self.routed_rows * (G - 1) / G * self.dim * self.act_bytes


def stage_workload(w: Workload, held: Sequence[int], first: bool, last: bool) -> Workload:
    """The part of whole-model workload `w` one pipeline rank runs: its blocks `held` (numbered from 0, in the
    order they run), the embedding's parameters on the first stage's rank, the output head on the last's."""
    position = {layer: k for k, layer in enumerate(held)}

    def local(layer: int) -> int | None:
        if layer in position:
            return position[layer]
        if layer == -1:
            return -1 if first else None
        if layer == w.n_layers:
            return len(held) if last else None
        return None

    params = tuple(ParamInfo(k, p.numel, p.expert) for layer, run in w.param_runs if (k := local(layer)) is not None
                   for p in run)
    return dataclasses.replace(
        w, pp=1, mtp_blocks=0, n_layers=len(held), moe_layers=tuple(position[i] for i in w.moe_layers if i in position),
        params=params, dense_flops=tuple(w.dense_flops[i] for i in held),
        attention_flops=tuple(w.attention_flops[i] for i in held),
        elementwise_bytes=tuple(w.elementwise_bytes[i] for i in held), head_flops=w.head_flops if last else 0.0,
        fp8_linears=tuple(w.fp8_linears[i] for i in held) if w.fp8_linears else (),
        model_flops_fwd=w.model_flops_fwd or sum(w.dense_flops) + w.head_flops, v_shape=False)


class Costs(Protocol):
    overlap_slowdown: float
    chunk_overhead_s: float
    """Host-side cost of each chunk beyond the first, per pass (splitting, launching, synchronising)."""

    def dense(self, w: Workload, layer: int, phase: Phase) -> float:
        """Everything in a block but the routed experts (attention, norms, router, dense or shared FFN);
        layer -1 and n_layers are the embedding and the output head."""
        ...

    def experts(self, w: Workload, rows: float, phase: Phase, chunks: int = 1) -> float:
        """The routed experts' GEMMs on `rows` rows, one of a pass's `chunks` (which share its FP8 weight casts)."""
        ...

    def selective_recompute(self, w: Workload, layer: int) -> float:
        """What train.recompute=selective runs again in one block's backward: attention's core and the
        memory-bound kernels of its forward (no GEMM)."""
        ...

    def fp8_dispatch_casts(self, w: Workload, rows: float) -> tuple[float, float]:
        """train.fp8_dispatch: seconds to pack `rows` rows before their dispatch and to unpack them after."""
        ...

    def all_to_all(self, w: Workload, nbytes: float) -> float: ...

    def staged_all_to_all(self, w: Workload, nbytes: float, stage: str) -> float:
        """One stage of the hierarchical exchange sending `nbytes` from this rank: "cross" (one peer per
        machine, over the network) or "node" (the ranks of this machine)."""
        ...

    def grad_reduce(self, w: Workload, nbytes: float, expert: bool, mode: str) -> float: ...

    def all_gather(self, w: Workload, nbytes: float, expert: bool) -> float:
        """Gather `nbytes` of parameters (the whole, not the shard) over dp, or edp for experts."""
        ...

    def optimizer(self, w: Workload, mode: str) -> float: ...

    def send(self, w: Workload, nbytes: float, across_machines: bool) -> float:
        """One point-to-point transfer of `nbytes` (a pipeline stage's activation or its gradient)."""
        ...


def _moe_pipeline(s: Schedule, w: Workload, costs: Costs, chunks: int, phase: Phase, last: int | None,
                  tag: str, dispatch: str = "flat") -> int:
    """Dispatch -> experts -> combine in `chunks` pieces, issued as the executor issues them. Hierarchical:
    the pieces cross machines (one packed row per (token, machine)), and each chunk's fan-out inside the
    machine runs before and after its experts."""
    if dispatch == "hierarchical" and w.ep_nodes > 1:
        return _chunked(s, w, costs, chunks, phase, last, tag,
                        costs.staged_all_to_all(w, w.cross_node_bytes("hierarchical") / chunks, "cross"),
                        costs.staged_all_to_all(w, w.in_node_bytes / chunks, "node"))
    if w.ep == 1:
        return _chunked(s, w, costs, chunks, phase, last, tag, 0.0)
    if phase == "fwd" and w.fp8_dispatch:  # the layer's rows packed at once, each chunk's unpacked on arrival
        pack, unpack = costs.fp8_dispatch_casts(w, w.routed_rows)
        last = s.add(f"{tag}.experts_pack", "compute", pack, [last])
        return _chunked(s, w, costs, chunks, phase, last, tag, costs.all_to_all(w, w.a2a_bytes / chunks),
                        a2a_in=costs.all_to_all(w, w.fp8_dispatch_bytes / chunks), unpack=unpack / chunks)
    return _chunked(s, w, costs, chunks, phase, last, tag, costs.all_to_all(w, w.a2a_bytes / chunks))


def _chunked(s: Schedule, w: Workload, costs: Costs, chunks: int, phase: Phase, last: int | None, tag: str,
             a2a: float, fan_out: float = 0.0, a2a_in: float | None = None, unpack: float = 0.0) -> int:
    """The pipelined exchange: each chunk's dispatch (`a2a_in` seconds where it differs from the combine's
    `a2a`: train.fp8_dispatch's forward, whose chunks are unpacked in `unpack` seconds each before their
    experts), experts and combine. `fan_out`: the in-machine exchange of hierarchical dispatch, each way, which
    the chunk's compute waits for (it is on the compute stream's path; counted as all-to-all work)."""
    a2a_in = a2a if a2a_in is None else a2a_in
    dispatch = [s.add(f"{tag}.a2a_in0", "comm", a2a_in, [last])]
    prev_compute = last
    combines = []
    for c in range(chunks):
        if c + 1 < chunks:  # issued once chunk c has arrived (and chunk c-1 computed: program order)
            dispatch.append(s.add(f"{tag}.a2a_in{c + 1}", "comm", a2a_in, [dispatch[c], prev_compute]))
        if c > 0 and costs.chunk_overhead_s > 0:
            prev_compute = s.add(f"{tag}.overhead{c}", "compute", costs.chunk_overhead_s, [prev_compute])
        if fan_out:
            prev_compute = s.add(f"{tag}.a2a_node_in{c}", "compute", fan_out, [dispatch[c], prev_compute])
        if unpack:
            prev_compute = s.add(f"{tag}.experts_unpack{c}", "compute", unpack, [dispatch[c], prev_compute])
        seconds = costs.experts(w, w.routed_rows / chunks, phase, chunks)
        if phase == "bwd" and (w.recompute == "experts" or w.recompute_experts and w.recompute != "full"):
            seconds += costs.experts(w, w.routed_rows / chunks, "fwd", chunks)
        if phase == "bwd" and w.recompute == "full" and chunks > 1:  # the executor's own rerun (overlap.py)
            seconds += costs.experts(w, w.routed_rows / chunks, "fwd", chunks)
        prev_compute = s.add(f"{tag}.experts{c}", "compute", seconds, [dispatch[c], prev_compute])
        if fan_out:
            prev_compute = s.add(f"{tag}.a2a_node_out{c}", "compute", fan_out, [prev_compute])
        combines.append(s.add(f"{tag}.a2a_out{c}", "comm", a2a, [prev_compute]))
    # The layer's output (or input gradient) is complete when every combine is home.
    return s.add(f"{tag}.join", "compute", 0.0, combines)


class _BucketLauncher:
    """Adds gradient-reduction tasks in program order: a bucket goes once all its layers finished backward
    and every earlier bucket of its list has gone (as BucketedReducer does)."""

    def __init__(self, s: Schedule, w: Workload, plan: Plan, costs: Costs) -> None:
        self.s, self.w, self.plan, self.costs = s, w, plan, costs
        self.lists = []
        for expert, sizes in ((False, plan.dense_buckets), (True, plan.expert_buckets)):
            params = [p for p in w.params if p.expert == expert]
            buckets, start = [], 0
            for size in sizes:
                if size:  # every parameter of the list frozen: nothing to reduce
                    buckets.append(params[start:start + size])
                start += size
            self.lists.append((expert, buckets, [0]))

    def launch_ready(self, finished_down_to: int, after: int) -> None:
        """Backward has finished every layer >= `finished_down_to`; `after` is the task that finished it."""
        for expert, buckets, next_index in self.lists:
            while next_index[0] < len(buckets):
                bucket = buckets[next_index[0]]
                if min(p.layer for p in bucket) < finished_down_to:
                    break
                nbytes = sum(p.numel for p in bucket) * self.w.grad_bytes
                self.s.add(f"grad.{'expert' if expert else 'dense'}{next_index[0]}", "grad",
                           self.costs.grad_reduce(self.w, nbytes, expert, self.plan.grad_sync), [after])
                next_index[0] += 1


class _FsdpUnits:
    """FSDP2's collectives in program order: a block's parameters (its unit's and its experts') gathered in
    each pass of `gathers` when the previous block starts (apply_fsdp's explicit prefetch), its gradients
    reduce-scattered when its backward ends; the root unit gathered once and kept."""

    def __init__(self, s: Schedule, w: Workload, costs: Costs, with_grads: bool, gathers: tuple[Phase, ...]):
        self.s, self.w, self.costs, self.with_grads, self.phases = s, w, costs, with_grads, gathers
        self.units: dict[int, list[ParamInfo]] = {}
        for p in w.params:
            self.units.setdefault(p.layer if 0 <= p.layer < w.n_layers else -1, []).append(p)
        self.gathers: dict[tuple[int, Phase], int] = {}

    def _bytes(self, unit: int, expert: bool, per_element: int) -> int:
        return sum(p.numel for p in self.units.get(unit, []) if p.expert == expert) * per_element

    def prefetch(self, unit: int, phase: Phase) -> None:
        if phase not in self.phases:
            return
        if 0 <= unit < self.w.n_layers or (unit == -1 and phase == "fwd"):  # the root stays gathered
            seconds = sum(self.costs.all_gather(self.w, self._bytes(unit, expert, self.w.act_bytes), expert)
                          for expert in (False, True))
            self.gathers[unit, phase] = self.s.add(f"fsdp.gather.L{unit}.{phase}", "comm", seconds)

    def ready(self, unit: int, phase: Phase) -> int | None:
        return self.gathers.get((unit, phase))

    def reduce(self, unit: int, after: int) -> None:
        if not self.with_grads:
            return
        for expert in (False, True):
            nbytes = self._bytes(unit, expert, self.w.grad_bytes)
            if nbytes:
                self.s.add(f"grad.fsdp.L{unit}{'.expert_shards' if expert else ''}", "grad",
                           self.costs.grad_reduce(self.w, nbytes, expert, "reduce_scatter"), [after])


def build_step(w: Workload, plan: Plan, costs: Costs, with_grads: bool = True, gathers=("fwd", "bwd")) -> Schedule:
    """Tasks of one micro-step, in the order the executor issues them; `with_grads` adds the gradient
    reduction, `gathers` the passes in which FSDP gathers parameters (see `micro_steps`)."""
    s = Schedule()
    moe_index = {layer: i for i, layer in enumerate(w.moe_layers)}
    fsdp = _FsdpUnits(s, w, costs, with_grads, gathers) if plan.grad_sync == "fsdp" else None

    def after(last: int | None, unit: int, phase: Phase) -> list[int | None]:
        """`last`, and under FSDP the unit's gather; issues the next unit's gather (prefetch)."""
        if fsdp is None:
            return [last]
        fsdp.prefetch(unit + 1 if phase == "fwd" else unit - 1, phase)
        return [last, fsdp.ready(unit, phase)]

    if fsdp is not None:
        fsdp.prefetch(-1, "fwd")
    last = s.add("embed.fwd", "compute", costs.dense(w, -1, "fwd"), after(None, -1, "fwd"))
    for layer in range(w.n_layers):
        last = s.add(f"L{layer}.dense.fwd", "compute", costs.dense(w, layer, "fwd"), after(last, layer, "fwd"))
        if layer in moe_index:
            i = moe_index[layer]
            last = _moe_pipeline(s, w, costs, plan.chunks[i], "fwd", last, f"L{layer}.moe.fwd", plan.dispatch_of(i))
    last = s.add("head.fwd", "compute", costs.dense(w, w.n_layers, "fwd"), [last])
    last = s.add("head.bwd", "compute", costs.dense(w, w.n_layers, "bwd"), [last])
    buckets = _BucketLauncher(s, w, plan, costs) if with_grads and fsdp is None else None
    overlap = buckets is not None and plan.overlap_grads
    if overlap:
        buckets.launch_ready(w.n_layers, last)
    if fsdp is not None:
        fsdp.prefetch(w.n_layers - 1, "bwd")
    for layer in reversed(range(w.n_layers)):
        last = s.add(f"L{layer}.bwd.start", "compute", 0.0, after(last, layer, "bwd"))
        if w.recompute == "selective":
            last = s.add(f"L{layer}.selective.recompute", "compute", costs.selective_recompute(w, layer), [last])
        if w.recompute == "full":  # the block's forward again, all-to-alls included
            last = s.add(f"L{layer}.dense.recompute", "compute", costs.dense(w, layer, "fwd"), [last])
            if layer in moe_index:
                i = moe_index[layer]
                last = _moe_pipeline(s, w, costs, plan.chunks[i], "fwd", last, f"L{layer}.moe.recompute",
                                     plan.dispatch_of(i))
        if layer in moe_index:
            i = moe_index[layer]
            last = _moe_pipeline(s, w, costs, plan.chunks[i], "bwd", last, f"L{layer}.moe.bwd", plan.dispatch_of(i))
        last = s.add(f"L{layer}.dense.bwd", "compute", costs.dense(w, layer, "bwd"), [last])
        if overlap:
            buckets.launch_ready(layer, last)
        if fsdp is not None:
            fsdp.reduce(layer, last)
    last = s.add("embed.bwd", "compute", costs.dense(w, -1, "bwd"), [last])
    if buckets is not None:
        buckets.launch_ready(-1, last)
    if fsdp is not None:
        fsdp.reduce(-1, last)
    return s


@dataclass(frozen=True)
class Prediction:
    step: float
    """Predicted seconds per optimizer step."""
    stages: dict[str, float]
    """Seconds of work per stage kind, summed over the step (before overlap)."""
    exposed_comm: float
    """Seconds per step the compute stream waits for communication."""
    comm: float
    """Seconds of communication work per step."""

    @property
    def hidden_fraction(self) -> float:
        return 0.0 if self.comm == 0 else max(0.0, 1.0 - self.exposed_comm / self.comm)

    def as_dict(self) -> dict[str, float]:
        return {"step_s": self.step, "exposed_comm_s": self.exposed_comm, "comm_s": self.comm,
                "hidden_fraction": self.hidden_fraction, **{f"{k}_s": v for k, v in self.stages.items()}}


def _stage_sums(t: Timeline) -> dict[str, float]:
    sums: dict[str, float] = {}
    for task in t.tasks:
        kind = ("a2a" if ".a2a" in task.name else "experts" if ".experts" in task.name
                else "chunk_overhead" if ".overhead" in task.name
                else "grad_reduce" if task.name.startswith("grad.")
                else "param_gather" if task.name.startswith("fsdp.gather") else "dense")
        sums[kind] = sums.get(kind, 0.0) + task.seconds
    return sums


def micro_steps(w: Workload, plan: Plan) -> list[tuple[int, bool, tuple[Phase, ...]]]:
    """(how many, reduce gradients?, passes that gather) of a step's micro-steps: fsdp gathers and reduces
    in each, or once (first forward, last backward), or gathers once and reduces in each (reduce_once
    False); replicated and ZeRO reduce in the last."""
    n, gathers = w.micro_steps, ("fwd",) if plan.grad_sync == "fsdp" else ()
    if plan.grad_sync == "fsdp" and plan.gather_once and not plan.reduce_once_on(0):  # a stage's: stage_prediction
        return [s for s in [(1, True, gathers), (n - 1, True, ())] if s[0] > 0]
    if plan.grad_sync != "fsdp" or plan.gather_once:
        steps = [(1, True, gathers)] if n == 1 else [(1, False, gathers), (n - 2, False, ()), (1, True, ())]
        return [s for s in steps if s[0] > 0]
    return [(n, True, ("fwd", "bwd"))]


def predict(w: Workload, plan: Plan, costs: Costs) -> Prediction:
    if w.pp > 1:
        return _predict_pipeline(w, plan, costs)
    step = exposed = comm = 0.0
    stages: dict[str, float] = {}
    for count, with_grads, gathers in micro_steps(w, plan):
        t = build_step(w, plan, costs, with_grads, gathers).run(costs.overlap_slowdown)
        step, exposed = step + count * t.makespan, exposed + count * t.exposed_comm
        comm += count * (t.work("comm") + t.work("grad"))
        for kind, seconds in _stage_sums(t).items():
            stages[kind] = stages.get(kind, 0.0) + count * seconds
    stages["optimizer"] = costs.optimizer(w, plan.grad_sync)
    return Prediction(step=step + stages["optimizer"], stages=stages, exposed_comm=exposed, comm=comm)


def _predict_pipeline(w: Workload, plan: Plan, costs: Costs) -> Prediction:
    """A step through w.pp pipeline stages (gpipe or 1f1b: both leave pp - 1 micro-steps of each stage idle,
    the bubble; with V stages per rank, pp - 1 of a stage's V-times shorter micro-steps, less what deferred
    weight steps fill: _weight_step_s): the slowest stage's step, plus the bubble and the activation transfers
    on its path. (The rank's V stages are
    predicted as one, its blocks together.) `w` is the whole model's workload on one stage's dp ranks; each stage's part is predicted
    as the training loop runs it (gradients reduced after the schedule's last backward)."""
    pp = w.pp
    spans: list[Sequence[int]] = list(rank_layers(w.n_layers - w.mtp_blocks, pp, w.stages_per_rank,
                                                  w.layers_per_stage, w.v_shape))
    last = next(r for r in range(pp) if holds_ends(r, pp, w.v_shape)[1])  # the MTP depths run with the last stage
    spans[last] = (*spans[last], *range(w.n_layers - w.mtp_blocks, w.n_layers))
    seen: dict[tuple, Prediction] = {}  # stages of the same blocks and plan predict the same
    stages = [stage_prediction(w, plan, costs, held, s, pp, seen) for s, held in enumerate(spans)]
    rank = max(range(pp), key=lambda r: stages[r].step)
    slowest = stages[rank]
    micro = (slowest.step - slowest.stages["optimizer"]) / w.micro_steps
    send = costs.send(w, w.tokens * w.dim * w.act_bytes, w.stages_across_machines)
    filled = 3 * _weight_step_s(w, plan, costs, spans[rank]) \
        if w.deferred_weight_steps and plan.holds_reduction_on(rank) else 0.0
    bubble = (pp - 1) * (max(0.0, micro - filled) / w.stages_per_rank + 2 * send)
    lanes = w.overlapped and plan.grad_sync != "fsdp"  # the lanes run with replicated stages only
    hidden = _hidden_by_lanes(w, slowest) if lanes else 0.0
    extra = {"lanes_hidden": -hidden} if lanes else {}
    return Prediction(step=slowest.step + bubble - hidden, stages={**slowest.stages, "pipeline_bubble": bubble, **extra},
                      exposed_comm=slowest.exposed_comm + 2 * (pp - 1) * send - hidden, comm=slowest.comm)


def _weight_step_s(w: Workload, plan: Plan, costs: Costs, held: Sequence[int]) -> float:
    """One micro-batch's weight step on a rank holding blocks `held` (models/weight_steps.py): the weight-gradient
    GEMMs of its linear layers and experts, as many FLOPs as their forward's GEMMs (attention's core and the
    memory-bound kernels have no weights; the output head's weight gradient stays in the input step), each
    block's in the share of its weights that train (frozen ones have no weight step), and no expert GEMMs in a
    layer the pipelined exchange runs (plan.chunks > 1: on copies of the weights, in the input step).

    A split backward's bubble is (pp - 1) (F + B - 2 W) per stage (Qi et al., Zero Bubble Pipeline Parallelism,
    2024: ZB-H1 and ZB-V), F, B and W a micro-batch's forward, input step and weight step; with a micro-step
    of F + B + W, micro - 3 W: what _predict_pipeline charges, none where W fills it all."""
    trained: dict[tuple[int, bool], int] = {}
    for p in w.params:
        trained[p.layer, p.expert] = trained.get((p.layer, p.expert), 0) + p.numel
    ordinal = {layer: k for k, layer in enumerate(w.moe_layers)}
    expert_weights = 3 * w.num_experts // w.ep * w.dim * w.expert_hidden  # one layer's, on this rank
    seconds = 0.0
    for layer in held:
        dense_weights = (w.layer_flops(layer) - w.attention_flops_of(layer)) / (2 * w.tokens)
        share = min(1.0, trained.get((layer, False), 0) / dense_weights) if dense_weights > 0 else 0.0
        seconds += share * (costs.dense(w, layer, "fwd") - costs.selective_recompute(w, layer))
        if layer in ordinal and (plan.chunks[ordinal[layer]] if plan.chunks else 1) <= 1:
            share = min(1.0, trained.get((layer, True), 0) / expert_weights)
            seconds += share * costs.experts(w, w.routed_rows, "fwd")
    return seconds


def stage_prediction(w: Workload, plan: Plan, costs: Costs, held: Sequence[int], rank: int, pp: int,
                     seen: dict[tuple, Prediction] | None = None) -> Prediction:
    """Pipeline rank `rank` of `pp`'s step over its blocks `held` of whole-model workload `w` (with the
    embedding on the first, the output head on the last), as the training loop runs it: gradients reduced after
    the schedule's last backward, or where fsdp reduces in every micro-step on this rank (Plan.reduce_once), in
    each. `seen`: predictions of stages already predicted, by what they run."""
    ordinal = {layer: k for k, layer in enumerate(w.moe_layers)}
    ws = stage_workload(w, held, *holds_ends(rank, pp, w.v_shape))
    mine = [ordinal[layer] for layer in w.moe_layers if layer in held]
    n_dense = sum(1 for p in ws.params if not p.expert)
    stage_plan = dataclasses.replace(  # one bucket per group, reduced after backward: PlainSync
        plan, chunks=tuple(plan.chunks[k] for k in mine),
        dispatch=tuple(plan.dispatch_of(k) for k in mine) if plan.dispatch else (),
        dense_buckets=(n_dense,) if n_dense else (),
        expert_buckets=(len(ws.params) - n_dense,) if len(ws.params) > n_dense else (),
        overlap_grads=plan.grad_sync == "fsdp", reduce_once=plan.reduce_once_on(rank))
    key = (ws.n_layers, ws.moe_layers, ws.dense_flops, ws.head_flops, len(ws.params), stage_plan.chunks,
           stage_plan.dispatch, stage_plan.reduce_once)
    seen = {} if seen is None else seen
    if key not in seen:
        seen[key] = predict(ws, stage_plan, costs)
    return seen[key]


def _hidden_by_lanes(w: Workload, stage: Prediction) -> float:
    """What overlapped_1f1b saves on `stage`'s step: each of the first stage's micro_steps - pp steady-state
    pairs (one micro-batch's forward beside another's backward, a micro-step's work together) costs
    max(compute, all-to-all work) instead of compute plus the exposed all-to-all time, one lane's
    collectives travelling while the other computes. dualpipev's pairs are of half a rank's blocks (one of
    its two stages each): its first rank's 2 n - 3 pp + 1 pairs in torch's order are n - 1.5 pp + 0.5 such
    micro-steps. The gradient reduction after the schedule stays exposed (replicated stages: the lanes do
    not run under fsdp)."""
    n = w.micro_steps
    pairs = n - 1.5 * w.pp + 0.5 if w.v_shape else n - w.pp
    per = {kind: seconds / n for kind, seconds in stage.stages.items()}
    compute = per.get("dense", 0.0) + per.get("experts", 0.0) + per.get("chunk_overhead", 0.0)
    a2a = per.get("a2a", 0.0)
    exposed_a2a = max(0.0, stage.exposed_comm - stage.stages.get("grad_reduce", 0.0)) / n
    return max(0.0, pairs) * max(0.0, compute + exposed_a2a - max(compute, a2a))


def workload_for(cfg: ModelConfig, *, tokens: int, seq_len: int, ep: int, dp: int, micro_steps: int,
                 act_bytes: int = 4, frozen: frozenset[str] = frozenset(), recompute: str = "none",
                 ranks_per_node: int = 0, grad_bytes: int = 4, moment_bytes: int = 4,
                 loss_chunk_tokens: int = 0, pp: int = 1, stages_per_rank: int = 1,
                 layers_per_stage: tuple[int, ...] = (), overlapped: bool = False, v_shape: bool = False,
                 deferred_weight_steps: bool = False, fp8: str = "none", fp8_dispatch: bool = False) -> Workload:
    """Shapes of one rank's step, from the model config alone (the model is built on the meta device).
    Parameters named in `frozen` have no gradient: they are left out of the buckets and the optimizer.
    `ranks_per_node`: machines of that many ranks (0: one machine). `pp` stages of `dp` ranks each, placed
    stage after stage (`v_shape`: two a rank in a V). `fp8`, `fp8_dispatch`: train.fp8, train.fp8_dispatch."""
    machines = ep // ranks_per_node if 0 < ranks_per_node < ep else 1
    infos = []
    for name, shape, expert in parameter_shapes(cfg):
        if name in frozen:
            continue
        numel = math.prod(shape)
        infos.append(ParamInfo(block_index(name, cfg), numel // ep if expert else numel, expert))
    blocks = range(cfg.n_blocks)  # the MTP depths' blocks run after the decoder's, before the head
    return Workload(tokens=tokens, seq_len=seq_len, dim=cfg.dim, expert_hidden=cfg.moe.ffn_dim,
                    num_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k, n_layers=cfg.n_blocks,
                    moe_layers=tuple(i for i in blocks if cfg.is_moe_layer(i)), ep=ep, dp=dp,
                    micro_steps=micro_steps, params=tuple(reversed(infos)), act_bytes=act_bytes,
                    grad_bytes=grad_bytes, moment_bytes=moment_bytes,
                    dense_flops=tuple(block_fwd_flops(cfg, tokens, seq_len, i) for i in blocks),
                    head_flops=head_fwd_flops(cfg, tokens),
                    attention_flops=tuple(attention_core_flops(cfg, tokens, seq_len, i) for i in blocks),
                    elementwise_bytes=tuple(block_elementwise_bytes(cfg, tokens, i, act_bytes) for i in blocks),
                    fp8_linears=fp8_linear_widths(cfg) if fp8 == "rowwise" else (),
                    fp8_experts=fp8 == "rowwise" and eligible(cfg.dim, cfg.moe.ffn_dim),
                    fp8_dispatch=fp8_dispatch and fp8 == "rowwise" and eligible(cfg.dim, cfg.moe.ffn_dim) and ep > 1,
                    recompute=recompute, recompute_experts=cfg.moe.recompute_experts,
                    ranks_per_node=ranks_per_node, loss_chunk_tokens=loss_chunk_tokens, pp=pp, mtp_blocks=cfg.mtp_layers,
                    stages_per_rank=stages_per_rank, layers_per_stage=layers_per_stage,
                    overlapped=overlapped and pp > 1, v_shape=v_shape and pp > 1,
                    deferred_weight_steps=deferred_weight_steps and pp > 1,
                    stages_across_machines=pp > 1 and 0 < ranks_per_node <= dp,
                    nodes_per_token=expected_nodes_per_token(
                        cfg.moe.num_experts, cfg.moe.top_k, machines,
                        machine_bound(cfg.moe, machines, cfg.moe.max_nodes_per_token)))


def moe_layer_timeline(w: Workload, costs: Costs, chunks: int, dispatch: str = "flat") -> Timeline:
    """One MoE layer alone, forward then backward, pipelined in `chunks` pieces."""
    s = Schedule()
    last = _moe_pipeline(s, w, costs, chunks, "fwd", None, "moe.fwd", dispatch)
    _moe_pipeline(s, w, costs, chunks, "bwd", last, "moe.bwd", dispatch)
    return s.run(costs.overlap_slowdown)


def model_flops(w: Workload) -> float:
    """FLOPs of one rank's step (a pipeline stage's rank: 1/pp of its rows' work) as MFU counts them (PaLM, Chowdhery et al. 2022, app. B): 3x the forward of
    every weight GEMM (experts at top_k rows a token) and of causal attention's core; no recompute."""
    experts = sum(6.0 * w.routed_rows * w.dim * w.expert_hidden for _ in w.moe_layers)
    return 3.0 * (sum(w.dense_flops) + w.head_flops + experts) * w.micro_steps / w.pp  # pp ranks share a row
