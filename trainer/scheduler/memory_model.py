"""Predict one rank's peak memory: model state (parameters, gradients, AdamW), activations kept for
backward under each recompute mode, and the transient buffers of the gradient sync and the loss.

An analytic count from the model config and the layout, no measurement: `moeyard plan` prints it for
any cluster, the planner uses it to pick a layout that fits, and `benchmarks/memory.py` puts it beside
the peak a real run measures. Bytes are float32 for weights, gradients and AdamW moments (the master
copy), `act_bytes` for activations and for FSDP's gathered compute weights. Sharded state is counted
on the largest rank: FSDP2 pads every rank to the first of `torch.chunk`'s pieces.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import dataclass
from typing import Sequence

import torch

from moeyard.models import ModelConfig
from moeyard.parallel.plan import ReduceOnce, holds_reduction, reduce_once_on
from moeyard.parallel.shards import expert_shard_dim, padded_shard_numel
from moeyard.parallel.stages import SPLIT_BACKWARD, V_SHAPED, holds_ends, rank_layers, stage_ids, stage_layers
from moeyard.trainer.scheduler.block_shapes import attention_shape, block_index, parameter_shapes

GB = 1e9
HEADROOM = 0.9
"""The share of a device's memory a run may plan for: the allocator's fragmentation and the runtime take
the rest."""
GPU_RUNTIME_GB = 2.0
"""What a GPU worker's CUDA context, NCCL's buffers and the allocator's reserve take beside the model."""
ALL_FORWARDS_FIRST = ("gpipe", "looped_bfs")
"""Pipeline schedules that run every micro-batch's forward before the first backward."""


def usable_gb(device_gb: float) -> float:
    """What a run may plan for on a GPU of `device_gb`: HEADROOM of what the runtime leaves."""
    return HEADROOM * (device_gb - GPU_RUNTIME_GB)


def usable_memory_gb(device: torch.device) -> float:
    """usable_gb of this rank's GPU; 0 on a CPU, whose memory the local workers share (the planner then
    keeps to layouts that hold no more than the configured one)."""
    if device.type != "cuda":
        return 0.0
    return usable_gb(torch.cuda.get_device_properties(device).total_memory / 1e9)


@dataclass(frozen=True)
class Layout:
    """How one step runs on one rank."""

    world: int
    ep: int
    tokens: int
    """Tokens per rank per micro-step."""
    grad_sync: str = "all_reduce"
    """all_reduce (replicated), reduce_scatter (ZeRO optimizer shards) or fsdp."""
    recompute: str = "none"
    """none, selective, experts or full (train.recompute)."""
    act_bytes: int = 4
    loss_chunk_tokens: int = 8192
    frozen: frozenset[str] = frozenset()
    micro_steps: int = 1
    """Micro-steps per optimizer step: with more than one, gradients accumulate through the forwards (but
    those of a pipeline stage that runs all of its forwards before its first backward)."""
    bucketed: bool = False
    """Gradients live in flat bucket buffers (a planned replicated sync, or reduce_scatter's ZeRO)."""
    gather_once: bool = False
    """fsdp: every unit's gathered weights and unsharded gradients stay through the step (Plan.gather_once)."""
    reduce_once: ReduceOnce = True
    """With gather_once: False reduces every micro-step's gradients, so only the weights stay unsharded (one
    value per pipeline rank where they differ)."""
    reduce_bytes: int = 4
    """Bytes per gradient element in the reduction (parallel.reduce_dtype): FSDP's unsharded accumulation."""
    moment_bytes: int = 4
    """Bytes per AdamW moment element (optim.moment_dtype: 2 for bfloat16)."""
    pp: int = 1
    """Pipeline stages (parallel.pp): each rank holds one stage's blocks; `world / pp` ranks share a stage."""
    pipeline: str = "1f1b"
    """schedule.pipeline: how many micro-batches' activations a stage holds at once (in_flight)."""
    stages_per_rank: int = 1
    """The looped schedules' stages on each rank (counted as one stage of their blocks; in_flight)."""
    layers_per_stage: tuple[int, ...] = ()
    """parallel.layers_per_stage: decoder blocks of each of the pp x stages_per_rank stages; (): even."""
    defer_weight_gradients: bool = True
    """schedule.defer_weight_gradients: a split-backward schedule's pending weight steps hold their GEMMs'
    operands (pending_weight_steps, _weight_step_bytes)."""
    fp8_experts: bool = False
    """train.fp8 on the routed experts: a block's pass holds its local experts' FP8 weight casts (_fp8_casts)."""
    lanes: bool = False
    """A forward and a backward run side by side in two threads (Config.lanes): each holds its own casts."""

    @property
    def dp(self) -> int:
        """Ranks that split the batch and shard the state: those of one pipeline stage."""
        return self.world // self.pp

    @property
    def v_shape(self) -> bool:
        """The stages placed in a V (parallel.stages.V_SHAPED): the first rank holds both ends of the model."""
        return self.pp > 1 and self.pipeline in V_SHAPED


def stage_blocks(cfg: ModelConfig, stage: int, pp: int, per_rank: int = 1, sizes: tuple[int, ...] = (),
                 v_shape: bool = False) -> Sequence[int]:
    """The blocks pipeline rank `stage` of `pp` runs (parallel.stages.rank_layers of its `per_rank` stages of
    `sizes` blocks, looped or in a V, where they are exact): its decoder blocks, and on the rank of the last
    stage the MTP depths'."""
    if pp == 1:
        return range(cfg.n_blocks)
    held = rank_layers(cfg.n_layers, pp, per_rank, sizes, v_shape)[stage]
    if not holds_ends(stage, pp, v_shape)[1]:
        return held
    return (*held, *range(cfg.n_layers, cfg.n_blocks)) if v_shape else range(held.start, cfg.n_blocks)


def _v_stages(cfg: ModelConfig, layout: Layout, rank: int) -> tuple[Sequence[int], Sequence[int]]:
    """The blocks of the two stages pipeline rank `rank` holds in a V: stage r's, then stage 2 pp - 1 - r's (on
    the first rank the last stage, with the MTP depths)."""
    spans = stage_layers(cfg.n_layers, 2 * layout.pp, layout.layers_per_stage)
    first, second = (spans[s] for s in stage_ids(rank, layout.pp, 2, v_shape=True))
    return first, (*second, *range(cfg.n_layers, cfg.n_blocks)) if holds_ends(rank, layout.pp, True)[1] else second


def pending_weight_steps(pipeline: str, pp: int, stage: int, per_rank: int) -> float:
    """Input steps whose weight step has not run yet, at most, on the rank of stage `stage`, in whole-rank
    micro-batches (an input step is one of its per_rank stages'): ZB1P and dualpipev (stage + 1) / per_rank,
    zbv_zero_bubble stage + 1/2 (counted from torch's orders, tests/unit/trainer/scheduler/test_memory_model.py).
    Each holds, where the gradient sync holds its reduction, its weight GEMMs' inputs and output gradients
    (_weight_step_bytes)."""
    if pp == 1 or pipeline not in SPLIT_BACKWARD:
        return 0.0
    return stage + 0.5 if pipeline == "zbv_zero_bubble" else (stage + 1) / per_rank


def v_in_flight(pipeline: str, pp: int, stage: int, micro_steps: int) -> tuple[tuple[int, int], ...]:
    """The V-placed schedules, rank `stage` holding stages r and 2 pp - 1 - r: the micro-batches whose
    activations each of its two stages holds at its peaks, as (stage r's, stage 2 pp - 1 - r's) pairs, every
    pair of counts the rank goes through being within one of them (so that stages of unequal blocks weigh each
    count by its own): dualpipev (at least 2 pp micro-batches) 2 pp - r and r + 1; zbv_zero_bubble min(n, 2 pp
    - 1 - r) and r + 1, and where n allows one more of the first for one fewer of the second (n micro-batches;
    counted from torch's orders, tests/unit/trainer/scheduler/test_memory_model.py)."""
    if pipeline == "dualpipev":
        return ((2 * pp - stage, stage + 1),)
    first = min(micro_steps, 2 * pp - 1 - stage)
    return ((first, stage + 1),) + (((first + 1, stage),) if first < micro_steps else ())


@functools.lru_cache(maxsize=None)
def v_states(pipeline: str, pp: int, stage: int, micro_steps: int) -> tuple[tuple[float, ...], ...]:
    """The V-placed schedules in torch's own order for the rank of stage `stage` (the schedule class's
    `_calculate_single_rank_operations`, private, read without process groups; 3 ms for 16 ranks of 64
    micro-batches): every (micro-batches whose activations stage r holds, stage 2 pp - 1 - r holds, input steps
    of stage r whose weight step has not run, of stage 2 pp - 1 - r, 1 while a weight step runs: its fresh
    weight gradients) the rank goes through that no other exceeds in all five. A torch without that function
    gets v_in_flight's pairs with all the pending weight steps (pending_weight_steps) on either stage: the bound
    this replaces."""
    from torch.distributed.pipelining import schedules

    cls = {"zbv_zero_bubble": schedules.ScheduleZBVZeroBubble, "dualpipev": schedules.ScheduleDualPipeV}[pipeline]
    fake = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=micro_steps, n_local_stages=2, num_stages=2 * pp,
                                 _num_stages=2 * pp)
    try:
        actions = cls._calculate_single_rank_operations(fake, stage)
    except (AttributeError, TypeError):
        pending = 2 * pending_weight_steps(pipeline, pp, stage, 2)
        return tuple((a, b, c, pending - c, 1) for a, b in v_in_flight(pipeline, pp, stage, micro_steps)
                     for c in (0.0, pending))
    first, second = stage, 2 * pp - 1 - stage
    held, pending = {first: 0, second: 0}, {first: 0, second: 0}
    seen = set()
    for action in (sub for a in actions if a is not None
                   for sub in (a.sub_actions if a.computation_type == schedules.OVERLAP_F_B else (a,))):
        kind, index = action.computation_type, action.stage_index
        if kind == schedules.BACKWARD_WEIGHT:  # it runs holding its operands, making its gradients
            seen.add((held[first], held[second], pending[first], pending[second], 1))
        held[index] += {schedules.FORWARD: 1, schedules.FULL_BACKWARD: -1, schedules.BACKWARD_INPUT: -1}.get(kind, 0)
        pending[index] += {schedules.BACKWARD_INPUT: 1, schedules.BACKWARD_WEIGHT: -1}.get(kind, 0)
        if kind == schedules.FULL_BACKWARD:  # torch runs its weight step at once, from the stash it just made
            one = {first: int(index == first), second: int(index == second)}
            seen.add((held[first], held[second], pending[first] + one[first], pending[second] + one[second], 1))
        seen.add((held[first], held[second], pending[first], pending[second], 0))
    return tuple(sorted(s for s in seen if not any(o != s and all(x >= y for x, y in zip(o, s)) for o in seen)))


def in_flight(pipeline: str, pp: int, stage: int, micro_steps: int, per_rank: int = 1) -> float:
    """Micro-batches whose activations the rank of stage `stage` holds at its peak, in whole-rank micro-batches:
    gpipe and looped_bfs run every forward before the first backward; 1f1b holds as many as the stages from
    it to the last (pp at the first stage); interleaved_1f1b with V stages a rank warms up with
    (V - 1) x R + 2 x (pp - 1 - stage) forwards of one of its V stages (torch's ScheduleInterleaved1F1B; R the
    micro-batches of a round: pp, or all of them when there are fewer than 2 pp),
    and runs one more before its first backward: that many V-ths of a micro-batch; interleaved_zero_bubble
    likewise with (V - 1) x R + (pp - 1 - stage) (ZB1P; what its pending weight steps hold besides is
    pending_weight_steps'); overlapped_1f1b
    holds one more than 1f1b (parallel/overlapped_1f1b.py); the V-placed schedules the most of v_in_flight's
    two stages together, half a rank's blocks being one of its stages: zbv_zero_bubble pp from 2 pp
    micro-batches up (with fewer, (micro-batches + 1 + stage) / 2 where that is less), dualpipev pp + 1/2."""
    if pp == 1:
        return 1
    if pipeline in V_SHAPED:
        return max(sum(pair) for pair in v_in_flight(pipeline, pp, stage, micro_steps)) / 2
    if pipeline in ALL_FORWARDS_FIRST:
        return micro_steps
    if pipeline in ("interleaved_1f1b", "interleaved_zero_bubble") and per_rank > 1:
        per_round = micro_steps // max(1, micro_steps // pp)  # pp, or all of them when fewer than 2 pp
        hops = (2 if pipeline == "interleaved_1f1b" else 1) * (pp - 1 - stage)
        forwards = (per_rank - 1) * per_round + hops + 1
        return min(forwards, micro_steps * per_rank) / per_rank
    if pipeline == "overlapped_1f1b":  # pp - stage forwards of warm-up, and the one beside each backward
        return min(pp - stage + 1, micro_steps)
    return min(pp - stage, micro_steps)


@dataclass(frozen=True)
class ParamCounts:
    """Elements of the whole model, split as the layout shards them."""

    dense: int
    experts: int
    """All experts of all layers (each rank holds experts / ep of them)."""
    dense_trainable: int
    experts_trainable: int
    root: int
    """Embedding, final norm and output layer (FSDP's root unit, kept gathered through backward)."""
    largest_block: int
    """Dense parameters of the largest block plus its experts / ep (one FSDP unit gathered)."""
    shapes: tuple[tuple[tuple[int, ...], bool, bool], ...] = ()
    """(shape of this rank's ep shard, expert, trainable) of every parameter: what FSDP shards."""

    def __add__(self, other: ParamCounts) -> ParamCounts:
        """The parameters of both parts (distinct blocks): sums, the larger of the largest blocks."""
        return ParamCounts(self.dense + other.dense, self.experts + other.experts,
                           self.dense_trainable + other.dense_trainable,
                           self.experts_trainable + other.experts_trainable, self.root + other.root,
                           max(self.largest_block, other.largest_block), self.shapes + other.shapes)

    def fsdp_shard(self, world: int, ep: int) -> tuple[int, int]:
        """(parameters, trainable parameters) of the largest rank under FSDP: dense sharded on dim 0 over
        world, experts over edp on the dimension apply_fsdp picks, each padded to its largest piece."""
        edp = world // ep
        params = trainable = 0
        for shape, expert, is_trainable in self.shapes:
            if expert:
                n = padded_shard_numel(shape, expert_shard_dim(shape, edp), edp)
            else:
                n = padded_shard_numel(shape, 0, world)
            params += n
            trainable += n if is_trainable else 0
        return params, trainable


def block_counts(cfg: ModelConfig, ep: int, frozen: frozenset[str] = frozenset()) -> dict[int, ParamCounts]:
    """The parameters of each block (block_index: -1 the embedding, n_blocks the final norm and output layer,
    counted as the root), which add up to any stage's (count_parameters)."""
    parts: dict[int, list] = {}
    for name, full, is_expert in parameter_shapes(cfg):
        parts.setdefault(block_index(name, cfg), []).append((name, full, is_expert))
    counts = {}
    for where, params in parts.items():
        dense = experts = dense_t = experts_t = 0
        shapes = []
        for name, full, is_expert in params:
            n = math.prod(full)
            shapes.append(((full[0] // ep, *full[1:]) if is_expert else full, is_expert, name not in frozen))
            if is_expert:
                experts, experts_t = experts + n, experts_t + (0 if name in frozen else n)
            else:
                dense, dense_t = dense + n, dense_t + (0 if name in frozen else n)
        in_block = 0 <= where < cfg.n_blocks
        size = dense + experts // ep
        counts[where] = ParamCounts(dense, experts, dense_t, experts_t, 0 if in_block else dense + experts,
                                    size if in_block else 0, tuple(shapes))
    return counts


def count_parameters(cfg: ModelConfig, ep: int, frozen: frozenset[str] = frozenset(), stage: int = 0,
                     pp: int = 1, per_rank: int = 1, sizes: tuple[int, ...] = (),
                     blocks: dict[int, ParamCounts] | None = None, v_shape: bool = False) -> ParamCounts:
    """The parameters of the whole model, or of pipeline rank `stage` of `pp` (stage_blocks; the embedding on
    the first, the final norm and output layer on the last, with its copy of the embedding where tied or
    read by the MTP depths; in a V the first rank holds both ends and one embedding). `blocks`:
    block_counts(cfg, ep, frozen), where the caller has them."""
    blocks = blocks if blocks is not None else block_counts(cfg, ep, frozen)
    held = stage_blocks(cfg, stage, pp, per_rank, sizes, v_shape)
    first, last = holds_ends(stage, pp, v_shape)
    embedding = first or (last and (cfg.tie_embeddings or cfg.mtp_layers > 0))
    where = [*([-1] if embedding else []), *held, *([cfg.n_blocks] if last else [])]
    return sum((blocks[b] for b in where if b in blocks), ParamCounts(0, 0, 0, 0, 0, 0))


@dataclass(frozen=True)
class MemoryEstimate:
    """A rank's bytes by kind, and its peak. Activations are largest when backward starts and are freed
    as it goes, while gradients appear; so the peak is the larger of the start of backward (activations
    and what lives beside them) and its end (every gradient and the reduction's buffers)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    with_activations: float
    """Transients beside the activations: gathered FSDP units, autocast's weight copies, the loss's logits."""
    after_backward: float
    """Transients beside all gradients: the flat copy a reduction after backward concatenates."""
    gradients_throughout: bool = False
    """Gradients live through the forward too: accumulated over micro-steps, or flat bucket buffers."""

    @property
    def buffers(self) -> float:
        return max(self.with_activations, self.after_backward)

    @property
    def start_of_backward(self) -> float:
        grads = self.gradients if self.gradients_throughout else 0.0
        return self.parameters + self.optimizer + grads + self.activations + self.with_activations

    @property
    def end_of_backward(self) -> float:
        return self.parameters + self.optimizer + self.gradients + self.after_backward

    @property
    def total(self) -> float:
        return max(self.start_of_backward, self.end_of_backward)

    def line(self, capacity_gb: float = 0.0, device: str = "") -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in
                          ("parameters", "gradients", "optimizer", "activations", "buffers"))
        when = "start" if self.start_of_backward >= self.end_of_backward else "end"
        text = f"memory per rank: {self.total / GB:.2f} GB predicted peak ({parts} GB; at the {when} of backward)"
        if capacity_gb:
            verdict = "fits" if self.fits(capacity_gb) else "does NOT fit"
            text += f"; {verdict} {device} ({capacity_gb:g} GB)"
        return text

    def fits(self, capacity_gb: float, headroom: float = HEADROOM) -> bool:
        """Within `headroom` of the device: the allocator's fragmentation and the runtime take the rest."""
        return self.total <= headroom * capacity_gb * GB


def _block_activations(cfg: ModelConfig, layer: int, tokens: int, b: int, recompute: str) -> float:
    """Bytes autograd keeps for one block's backward: residual stream in float32, the rest in `b` bytes.
    `recompute`: none, selective (GEMM outputs and region inputs only, models/recompute.py) or experts
    (the routed experts keep their input rows only); full is counted by the caller."""
    d, a = cfg.dim, attention_shape(cfg)
    selective = recompute == "selective"
    if selective:
        # The block's input, q/k/v and the output projection's output (MLA: its latents), the FFN's normed input.
        per_token = 4 * d + b * (a.q + a.k + a.v) + b * d + b * a.latent + b * d
    else:
        # Two norms (input, normalised, output), q/k/v before and after rope, attention output and its
        # log-sum-exp, the output projection's input; MLA's latents before and after their norms.
        per_token = 2 * 4 * d + 2 * b * d + b * (2 * a.q + 2 * a.k + a.v + a.out) + b * a.out + 4 * cfg.n_heads
        per_token += 2 * b * a.latent
    if layer >= cfg.n_layers:  # an MTP depth: its two normed inputs, their concatenation, eh_proj's output
        per_token += b * 5 * d

    def swiglu(f: int) -> int:
        """Per token: gate, up, silu(gate) and their product; selective: gate, up and the down GEMM's output."""
        return 2 * f + d if selective else 4 * f

    if not cfg.is_moe_layer(layer):
        return tokens * (per_token + b * swiglu(cfg.ffn_dim))
    moe = cfg.moe_for_layer(layer)
    rows = tokens * moe.top_k
    per_token += 3 * 4 * moe.num_experts  # router logits, probabilities, chosen weights (float32)
    per_token += b * swiglu(moe.shared_hidden_dim) if moe.num_shared_experts else 0
    # the rows the experts received and the outputs brought back (the combine's); what was sent and what the
    # experts returned travel on and are not kept (counted by saved-tensor hooks on a block: 29.1 MiB where
    # 4 rows' worth made 33.6)
    routed = rows * b * 2 * d
    if recompute != "experts" and not cfg.moe.recompute_experts:
        routed += rows * b * (2 if selective else 4) * moe.ffn_dim  # gate, up (, silu(gate), their product)
    return tokens * per_token + routed


def _local_experts(cfg: ModelConfig, layout: Layout, block: int) -> int:
    """Elements of one MoE block's gate, up and down weights on one rank (its experts / ep)."""
    moe = cfg.moe_for_layer(block)
    return 3 * moe.num_experts // layout.ep * cfg.dim * moe.ffn_dim


def _fp8_casts(cfg: ModelConfig, layout: Layout, blocks: Sequence[int]) -> float:
    """The FP8 casts of MoE blocks' local experts held at the peak, a byte an element: the pipelined exchange's
    chunks share a block's through its pass (models/float8.py shared_weight_casts). A backward holds the input
    gradient's orientation, and the forward's too where it runs the experts again (recompute=experts; under
    selective the grouped GEMM's checkpoint reruns its forward; under full the pipelined exchange reruns its
    chunks); lanes add the other lane's forward. Counted whatever the chunks: at one chunk the grouped GEMM
    holds one weight's cast at a time (an overcount there)."""
    moe_blocks = [i for i in blocks if cfg.is_moe_layer(i)]
    if not layout.fp8_experts or not moe_blocks:
        return 0.0
    local = max(_local_experts(cfg, layout, i) for i in moe_blocks)
    rerun = layout.recompute != "none" or cfg.moe.recompute_experts
    return local * (1 + int(rerun) + int(layout.lanes))


def _defers(layout: Layout) -> bool:
    """A split-backward schedule whose weight steps get the weight gradients (schedule.defer_weight_gradients)."""
    return layout.defer_weight_gradients and layout.pp > 1 and layout.pipeline in SPLIT_BACKWARD


def _weight_step_bytes(cfg: ModelConfig, layer: int, tokens: int, b: int) -> float:
    """What one block's pending weight step holds (models/weight_steps.py: the gradient sync holding its
    reduction): each linear layer's and expert's input rows and output gradient, per token the attention's
    normed input, latents and weighted sum, its projections' outputs, the FFNs' (dense, shared, routed: a
    row per expert copy) input, hidden and outputs."""
    d, a = cfg.dim, attention_shape(cfg)
    per_token = 2 * d + a.q + a.k + a.v + a.out + 2 * a.latent
    per_token += 3 * d if layer >= cfg.n_layers else 0  # an MTP depth's eh_proj
    if not cfg.is_moe_layer(layer):
        return tokens * b * (per_token + 2 * d + 3 * cfg.ffn_dim)
    moe = cfg.moe_for_layer(layer)
    per_token += 2 * d + 3 * moe.shared_hidden_dim if moe.num_shared_experts else 0
    return tokens * b * (per_token + moe.top_k * (2 * d + 3 * moe.ffn_dim))


def _head_bytes(cfg: ModelConfig, layout: Layout) -> float:
    """The output layer's float32 logits and their gradient: whole (the next token's and each MTP depth's,
    all kept for backward), or one chunk at a time."""
    if layout.loss_chunk_tokens > 0:
        return 3 * 4 * min(layout.tokens, layout.loss_chunk_tokens) * cfg.vocab_size
    return 3 * 4 * layout.tokens * cfg.vocab_size * (1 + cfg.mtp_layers)


def stage_counts(cfg: ModelConfig, layout: Layout) -> tuple[ParamCounts, ...]:
    """count_parameters of each pipeline stage."""
    blocks = block_counts(cfg, layout.ep, layout.frozen)
    return tuple(count_parameters(cfg, layout.ep, layout.frozen, s, layout.pp, layout.stages_per_rank,
                                  layout.layers_per_stage, blocks, layout.v_shape) for s in range(layout.pp))


def predict_memory(cfg: ModelConfig, layout: Layout,
                   counts: ParamCounts | tuple[ParamCounts, ...] | None = None) -> MemoryEstimate:
    """The largest rank's. `counts`, when the caller has them already: count_parameters(cfg, layout.ep,
    layout.frozen), or with pipeline stages stage_counts(cfg, layout)."""
    if layout.pp == 1:
        whole = counts if isinstance(counts, ParamCounts) else count_parameters(cfg, layout.ep, layout.frozen)
        return predict_stage(cfg, layout, whole, 0)
    per_stage = counts if isinstance(counts, tuple) and len(counts) == layout.pp else stage_counts(cfg, layout)
    return max((predict_stage(cfg, layout, c, s) for s, c in enumerate(per_stage)), key=lambda m: m.total)


def predict_stage(cfg: ModelConfig, layout: Layout, c: ParamCounts, stage: int) -> MemoryEstimate:
    """One rank of pipeline stage `stage` (the only one without stages): its parameters are `c`."""
    world = layout.dp  # the ranks that shard this stage's state
    held = stage_blocks(cfg, stage, layout.pp, layout.stages_per_rank, layout.layers_per_stage, layout.v_shape)
    last = holds_ends(stage, layout.pp, layout.v_shape)[1]
    edp = world // layout.ep
    x, xt = c.experts / layout.ep, c.experts_trainable / layout.ep  # this rank's ep shard
    if layout.grad_sync == "fsdp":
        shard, shard_trainable = c.fsdp_shard(world, layout.ep)
        params, grads, optimizer = 4 * shard, 4 * shard_trainable, 2 * layout.moment_bytes * shard_trainable
        # The root unit stays gathered; two blocks gathered (this one and the prefetched next one) and
        # one block's unsharded float32 gradients before its reduce-scatter -- through backward to its
        # end, where the first block and the root are reduced last (measured: 4.97 GB peak against
        # 4.28 GB of state on the 1B model of benchmarks/memory.py).
        with_activations = after_backward = layout.act_bytes * (c.root + 2 * c.largest_block) + 4 * c.largest_block
        if layout.gather_once:  # every unit stays gathered through the step (the root as before)
            params += layout.act_bytes * (c.dense + x)
            with_activations = after_backward = 4 * c.largest_block
            if layout.micro_steps > 1 and reduce_once_on(layout.reduce_once, stage):
                # Unsharded gradients accumulate to the last micro-step, whose backward reduce-scatters them
                # unit by unit, each unit's shard replacing its unsharded gradient (the shards were freed at the
                # step before): the larger of the two, not both (measured: the sum overestimated the peak of
                # three gathered-once layouts by 5-10%).
                grads = max(grads, layout.reduce_bytes * (c.dense_trainable + xt))
                if _defers(layout) and layout.reduce_bytes > layout.act_bytes:
                    # FSDP2 moves each backward's compute-dtype gradients into its reduce-dtype accumulator;
                    # a deferred weight step adds to .grad after that, so both stand until the next backward
                    grads += layout.act_bytes * (c.dense_trainable + xt)
    else:
        params = 4 * (c.dense + x)
        grads = 4 * (c.dense_trainable + xt)
        if layout.grad_sync == "reduce_scatter":
            # moments and a float32 master shard
            optimizer = (4 + 2 * layout.moment_bytes) * (c.dense_trainable / world + xt / edp)
        else:
            optimizer = 2 * layout.moment_bytes * (c.dense_trainable + xt)
        # autocast's copies: one of the dense weights for the step (its cache); the experts' paths cast their
        # weights per call and save the casts, a copy per micro-batch in flight (kept() below), but under full
        # recompute, where one block's copy stands at a time
        with_activations = layout.act_bytes * (c.dense + (x if layout.recompute == "full" else 0.0)) \
            if layout.act_bytes < 4 else 0.0
        # Buckets reduce in place; the reference concatenates each group (dense, experts) once.
        after_backward = 0.0 if layout.bucketed else 4 * max(c.dense_trainable, xt)
    per_block = {i: _block_activations(cfg, i, layout.tokens, layout.act_bytes,
                                       "none" if layout.recompute == "full" else layout.recompute) for i in held}
    flight = in_flight(layout.pipeline, layout.pp, stage, layout.micro_steps, layout.stages_per_rank)

    # replicated or ZeRO under autocast: a micro-batch's MoE blocks keep the bf16 casts of their local experts
    copies = layout.grad_sync != "fsdp" and layout.act_bytes < 4

    def kept(blocks: Sequence[int]) -> float:
        """What one micro-batch of `blocks` keeps for backward: under full recompute their inputs only."""
        if layout.recompute == "full":
            return len(blocks) * layout.tokens * 4 * cfg.dim
        casts = sum(layout.act_bytes * _local_experts(cfg, layout, i) for i in blocks if cfg.is_moe_layer(i))
        return sum(per_block[i] for i in blocks) + (casts if copies else 0.0)

    # the final norm's input and output (the last stage), the embedding's output (a later stage: the input it
    # received)
    final_norm = 2.0 * 4 * layout.tokens * cfg.dim
    held_reduction = holds_reduction(layout.grad_sync == "fsdp", layout.gather_once, layout.reduce_once, stage)
    deferred = _defers(layout) and held_reduction  # pending weight steps hold their GEMMs' operands
    # a block's weight gradients made into new tensors before they are added to the accumulated ones (the output
    # layer's, per loss chunk, on the last stage: never deferred)
    fresh = 4 * max(c.largest_block, cfg.vocab_size * cfg.dim if last else 0)

    def stash(blocks: Sequence[int]) -> float:
        return sum(_weight_step_bytes(cfg, i, layout.tokens, layout.act_bytes) for i in blocks) if deferred else 0.0

    if layout.v_shape and layout.pp > 1:  # each of the rank's two stages with its own counts, as torch orders them
        first, second = _v_stages(cfg, layout, stage)
        activations = max(a * kept(first) + b * (kept(second) + final_norm * int(last)) + p * stash(first)
                          + q * stash(second) + w * (fresh if deferred else 0.0)  # w: a weight step runs
                          for a, b, p, q, w in v_states(layout.pipeline, layout.pp, stage, layout.micro_steps))
    else:
        pending = pending_weight_steps(layout.pipeline, layout.pp, stage, layout.stages_per_rank)
        activations = flight * (kept(held) + final_norm * int(last)) + pending * stash(held)
    activations += flight * 4 * layout.tokens * cfg.dim + _fp8_casts(cfg, layout, held)
    if layout.recompute == "full":  # one block's activations while it is recomputed
        activations += max(per_block.values(), default=0.0)
    elif layout.recompute == "selective":  # what one block's recomputation brings back for its backward
        activations += max((_block_activations(cfg, i, layout.tokens, layout.act_bytes, "none") - p
                            for i, p in per_block.items()), default=0.0)
    # Gradients have accumulated when the first backward starts, unless every forward of the step ran before it
    # (gpipe, looped_bfs; 1f1b's first stages when the step has no more micro-batches than they hold)
    accumulated = layout.micro_steps > 1 and (layout.pp == 1 or layout.v_shape or flight < layout.micro_steps)
    if layout.grad_sync != "fsdp" and accumulated and not deferred:
        # at the peak, beside the activations (fsdp counts its unit's above). Deferred weight steps make theirs
        # as they run: a V rank's states count them; interleaved_zero_bubble's are left out (no row of
        # benchmarks/memory.py measures that schedule)
        activations += fresh
    head = _head_bytes(cfg, layout) if last else 0.0
    throughout = accumulated or (layout.bucketed and layout.grad_sync != "fsdp")
    return MemoryEstimate(params, grads, optimizer, activations, with_activations + head, after_backward, throughout)


def smallest_world(cfg: ModelConfig, layout: Layout, capacity_gb: float, max_world: int = 4096) -> int | None:
    """The fewest ranks (a multiple of pp x ep, same micro-batch per rank) on which this layout fits; None
    if none up to `max_world` does (activations or the replicated state alone are too large)."""
    counts = stage_counts(cfg, layout) if layout.pp > 1 else count_parameters(cfg, layout.ep, layout.frozen)
    for world in range(layout.ep * layout.pp, max_world + 1, layout.ep * layout.pp):
        if predict_memory(cfg, dataclasses.replace(layout, world=world), counts).fits(capacity_gb):
            return world
    return None
