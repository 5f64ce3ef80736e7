"""Pipeline stages on torch's own `torch.distributed.pipelining`: which blocks each stage holds, the module a
stage runs, and the schedule that runs the micro-batches through the stages.

Each rank holds one stage (parallel.pp of them, outermost in the mesh: parallel/mesh.py); inside a stage
expert parallelism, FSDP, recompute and the exchange executor work as without stages, over the stage's own
dp, ep and edp groups. The first stage holds the embedding, the last the final norm, the output layer and
the loss. torch's schedules send one activation per micro-batch between stages and only the last stage
has a loss, so each stage's router losses (MoE balance and z losses, the adapters' balance losses) ride on
its output: `carry_router_loss` passes the activation through unchanged and gives the router loss its
gradient when the activation's gradient comes back, as Megatron-Core's MoEAuxLossAutoScaler does.

The last stage keeps a copy of the embedding where the output layer shares it (tied) or the MTP depths read
it; the two copies' gradients are summed (`sum_copied_gradients`) before the norm, and both stages take the
same update. The MTP depths run on the last stage, which is also given the token ids.

gpipe, 1f1b and overlapped_1f1b (parallel/overlapped_1f1b.py: a forward beside a backward) run one stage per
rank; interleaved_1f1b, looped_bfs and interleaved_zero_bubble run V = schedule.stages_per_rank stages per rank,
looped (rank r holds stages r, r + pp, ...: one model holding all of them, a StageModule and PipelineStage per
stage); zbv_zero_bubble and dualpipev two per rank in a V (rank r holds stages r and 2 pp - 1 - r: the first
rank both ends of the model and one embedding, which the MTP depths and a tied output layer read there).

interleaved_zero_bubble (ZB1P), zbv_zero_bubble and dualpipev split each backward into an input step and a
weight step (dualpipev also runs some whole), and torch finds the
weight step's work by walking the autograd graph back from the weights. Tried on these stages it stops at
the stage's output, a view it detaches in place; past that, its weight step would run again every autograd
Function whose inputs hold both activations and weights (the experts' loop; the pipelined exchange, with its
all-to-alls inside: on one rank alone). Its stages are given a weight-step builder instead (torch's
`dw_builder`), with which torch runs the whole backward in the input step and then the weight step we build.
Where the gradient sync can hold its reduction until the schedule is done (`GradSync.holds_reduction`:
replicated stages, and fsdp gathered once and reducing once, whose units are told no backward is the last and
reduce after the schedule, as torch's own stage reduces an FSDP module), the step is armed
(models/weight_steps.py splitting_backward): the blocks' linear layers, the grouped GEMM and the expert loop
queue their weight-gradient GEMMs in the input step, and the weight step runs them: the work that fills the
bubble. Elsewhere (fsdp reducing in every micro-step: a unit reduces when its input gradient is computed) the
weight step is empty and the bubble interleaved_1f1b's. What stays in the input step: the router's, the
embedding's and the output layer's gradients, biases, and the pipelined exchange's chunks (experts on copies
of the weights).

The gradient sync is told before each of a stage's backwards whether it is the last of the step
(`StepStage`), as the unpipelined loop tells it before each micro-step: FSDP units gathered once keep their
weights and unsharded gradients through the schedule and reduce in their stage's last backward (or, where a
zero-bubble schedule's weight steps hold the reduction, after the schedule: no backward is told it is the
last). A rank's stages share one FSDP root (parallel/fsdp.py): with several of them the sync hears `last` in
the rank's final backward, each stage's own units are set to reduce in the stage's last, and the root stays
gathered until the final one (Pipeline._stage_before_backward).

Shape legend (models/__init__.py): B, T, D, V.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import FORWARD as _FORWARD
from torch.distributed.pipelining.schedules import _Action, _add_send_recv
from torch.distributed.tensor import DTensor

from moeyard.models import MoEStats, Transformer
from moeyard.models.peft.adapters import AdapterStats, recording_adapters, with_adapter_losses
from moeyard.models.weight_steps import deferring_weight_gradients, splitting_backward
from moeyard.parallel.mesh import ParallelMesh
from moeyard.parallel.stages import V_SHAPED, holds_ends, stage_ids, stage_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
"""schedule.pipeline: the torch schedules with one stage per rank (and overlapped_1f1b: _schedule_class)."""
LOOPED_SCHEDULES = {"interleaved_1f1b": ScheduleInterleaved1F1B, "looped_bfs": ScheduleLoopedBFS,
                    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble}
"""schedule.pipeline: the torch schedules with several stages per rank, placed in loops."""
V_SCHEDULES = {"zbv_zero_bubble": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
"""schedule.pipeline: the torch schedules with two stages per rank, placed in a V (parallel.stages.V_SHAPED)."""
SPLIT_BACKWARD = (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV)
"""Schedules with separate input and weight steps of backward (StepStage runs the whole in the input step)."""


def keep_this_stage(model: Transformer, pmesh: ParallelMesh, per_rank: int = 1,
                    sizes: Optional[list[int]] = None, schedule: str = "1f1b") -> tuple[range, ...]:
    """Reduce a model built on the meta device to this rank's `per_rank` stages (before anything is
    allocated) of `sizes` blocks each (parallel.layers_per_stage; None: even), placed as `schedule` places
    them (looped, or in a V); returns their blocks, stage by stage."""
    v_shape = schedule in V_SHAPED
    spans = stage_layers(model.cfg.n_layers, pmesh.pp * per_rank, sizes)
    parts = tuple(spans[i] for i in stage_ids(pmesh.pp_rank, pmesh.pp, per_rank, v_shape))
    first, last = holds_ends(pmesh.pp_rank, pmesh.pp, v_shape)
    model.keep_stage(parts, first=first, last=last)
    return parts


class _CarryRouterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, router_loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(router_loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (router_loss,) = ctx.saved_tensors
        return grad, torch.full_like(router_loss, ctx.scale), None


def carry_router_loss(x: Tensor, router_loss: Tensor, scale: float) -> Tensor:
    """`x` unchanged; in backward, `router_loss` gets the gradient `scale` (its weight in the objective)."""
    return _CarryRouterLoss.apply(x, router_loss, scale)


@dataclass(frozen=True)
class StageForward:
    """What one stage's forward of one micro-batch reports (the step's statistics gather them)."""
    moe_stats: dict[int, MoEStats]
    adapter_stats: dict[str, AdapterStats]
    aux_loss: Tensor
    """Weighted balance losses of this stage's MoE layers, then of its routed adapters."""
    z_loss: Tensor


class StageModule(nn.Module):
    """The module torch's PipelineStage runs: this rank's part of the model (keep_this_stage), its router
    losses carried on its output, its statistics kept in `forwards` for the step to read."""

    def __init__(self, model: Transformer, blocks: range, logits: bool) -> None:
        super().__init__()
        self.model, self.blocks = model, blocks
        self.logits = logits
        """The last stage returns logits (else the normed hidden states, for a loss in chunks)."""
        self.router_scale = 1.0
        """Weight of the router losses in the objective (1 / micro-batches), set by the step."""
        self.forwards: list[StageForward] = []

    def forward(self, x: Tensor, segment_BT: Optional[Tensor] = None,
                tokens_BT: Optional[Tensor] = None) -> Tensor | tuple[Tensor, ...]:
        """The last stage returns its output and then each MTP depth's hidden states (`tokens_BT`: the token
        ids, which its MTP depths embed; the other stages ignore them)."""
        with recording_adapters() as adapters:
            out = self.model(x, segment_BT, logits=self.logits, mtp=torch.is_grad_enabled(), stage_tokens_BT=tokens_BT,
                             blocks=self.blocks)
        aux_loss = with_adapter_losses(out.aux_loss, adapters, self.model.cfg.peft.aux_loss_coef)
        self.forwards.append(StageForward(out.moe_stats, adapters, aux_loss, out.z_loss))
        y = out.logits_BTV if out.logits_BTV is not None else out.hidden_BTD
        if torch.is_grad_enabled():
            y = carry_router_loss(y, aux_loss + out.z_loss, self.router_scale)
        return (y, *out.mtp_hidden) if out.mtp_hidden else y


def sum_copied_gradients(model: Transformer, pmesh: ParallelMesh) -> None:
    """Give the embedding on the first stage and its copy on the last (keep_stage) the sum of both
    gradients, so that both take the same update: before the gradient norm, which counts it once. Stages in
    a V hold the first and the last on one rank, with one embedding: nothing to sum."""
    copied = model.cfg.tie_embeddings or model.cfg.mtp_layers > 0
    holds_first = pmesh.pp_rank == 0
    both_ends = holds_first and model.output is not None
    if pmesh.embedding_group is None or not copied or both_ends or not (holds_first or model.embedding_copy):
        return
    weight = model.tok_embeddings.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    grad = weight.grad.to_local() if isinstance(weight.grad, DTensor) else weight.grad  # FSDP's shard: the same
    dist.all_reduce(grad, group=pmesh.embedding_group)  # rows on both stages (their dp layouts are the same)


LossFn = Callable[[Tensor | tuple[Tensor, ...], Tensor], Tensor]

INFERRED_FORWARDS = """In a schedule's first step torch infers the shapes each stage sends by running one extra forward per
stage (and a backward to its inputs, calling the loss on the last stage) before the micro-batches: on the
first micro-batch at stage 0, on uninitialised tensors after it. What those report is not the step's."""


@dataclass
class WeightSteps:
    """The weight steps of a split-backward schedule, shared by a rank's stages (Pipeline.run sets them)."""

    defer: bool = False
    """Whether weight-gradient GEMMs wait for the weight step (GradSync.holds_reduction)."""
    ran: int = 0
    """Weight-gradient GEMMs (an expert loop's: one) the weight steps computed in this step."""
    queued: list[Callable[[], None]] = field(default_factory=list)
    """What the input step being run has queued."""


class StepStage(PipelineStage):
    """torch's PipelineStage, which calls `before_backward(last)` before each backward of the step: True in
    the last. torch sets FSDP2's per-backward flags itself only where the stage's module is an FSDP root; here
    the root is the model inside the StageModule, and the gradient sync decides what the flags are.

    `weight_steps` (SPLIT_BACKWARD schedules): the whole backward runs in the input step, with the
    weight-gradient GEMMs queued where `weight_steps.defer`; the weight step runs what that input step queued.
    torch tells an input step it is never the last (the weight step is), so the stage counts its backwards:
    the step's last is the one of its last micro-batch (its gradient sync's flags are set there; a deferred
    weight step only adds to gradients that are reduced after the schedule)."""

    def __init__(self, *args, before_backward: Callable[[bool], None], weight_steps: Optional[WeightSteps] = None,
                 **kwargs) -> None:
        super().__init__(*args, dw_builder=self._weight_step if weight_steps is not None else None, **kwargs)
        self.before_backward, self.weight_steps = before_backward, weight_steps
        self.backwards = 0
        """Backwards run in this step."""

    def clear_runtime_states(self) -> None:
        """At the start of each step (torch's schedules call it there)."""
        super().clear_runtime_states()
        self.backwards = 0

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        self.backwards += 1
        steps = self.weight_steps
        last = last_backward or (steps is not None and self.backwards == self.chunks)
        self.before_backward(last)
        with deferring_weight_gradients(steps.queued) if steps is not None and steps.defer else nullcontext():
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last)

    def _weight_step(self) -> Callable[[], None]:
        """torch's dw_builder, called right after each input step's backward: a runner of what it queued."""
        steps = self.weight_steps
        queued, steps.queued = steps.queued, []

        def run() -> None:
            for work in queued:
                work()
            steps.ran += len(queued)
        return run


class _VForwards(ScheduleZBVZeroBubble):
    """Forward only through stages placed in a V, for held-out batches: each rank runs every micro-batch through
    its first stage, then through its second. torch's V schedules run forward only by skipping their backward
    steps, which then fail handing the gradient between a rank's two stages."""

    def __init__(self, stages: list[PipelineStage], n_microbatches: int, **kwargs) -> None:
        super().__init__(stages, n_microbatches, **kwargs)
        pp = self.pp_group_size
        self.pipeline_order = {r: [_Action(s, _FORWARD, m) for s in stage_ids(r, pp, 2, v_shape=True)
                                   for m in range(n_microbatches)] for r in range(pp)}
        # lowered with the sends and receives here: torch's _prepare_schedule_with_comms first checks that every
        # micro-batch has its backward
        self.pipeline_order_with_comms = _add_send_recv(
            {r: list(order) for r, order in self.pipeline_order.items()},
            stage_to_rank=lambda s: self.stage_index_to_group_rank[s], num_stages=self._num_stages)


def _schedule_class(name: str, lanes: bool) -> type:
    """schedule.pipeline's class; `lanes`: dualpipev's paired forward and backward side by side (replicated
    stages: FSDP2's hooks are not made for two threads). overlapped_1f1b's module is imported only when asked
    for: it is built on torch's private runtime schedule, which a torch release may lay out differently."""
    if name == "overlapped_1f1b":
        from moeyard.parallel.overlapped_1f1b import OverlappedOneFOneB

        return OverlappedOneFOneB
    if name == "dualpipev" and lanes:
        from moeyard.parallel.overlapped_1f1b import OverlappedDualPipeV

        return OverlappedDualPipeV
    return {**SCHEDULES, **LOOPED_SCHEDULES, **V_SCHEDULES}[name]


class Pipeline:
    """This rank's stages and the schedule that runs a step's micro-batches through every stage."""

    def __init__(self, model: Transformer, pmesh: ParallelMesh, schedule: str, device: torch.device,
                 logits: bool, loss_fn: LossFn, lanes: bool = False, defer_weight_gradients: bool = True) -> None:
        """`lanes`: `pmesh` has the backward lane's twin groups (parallel/lanes.py), so that dualpipev may run
        its pairs side by side where the stages are replicated (the plan may have chosen fsdp instead);
        `defer_weight_gradients`: schedule.defer_weight_gradients."""
        per_rank = len(model.held_parts)
        assert pmesh.pp_group is not None and schedule in (
            (*SCHEDULES, "overlapped_1f1b") if per_rank == 1 else {**LOOPED_SCHEDULES, **V_SCHEDULES}), \
            "checked when the run config was resolved"
        ids = stage_ids(pmesh.pp_rank, pmesh.pp, per_rank, schedule in V_SCHEDULES)
        self.stage_count = pmesh.pp * per_rank
        self.modules = [StageModule(model, part, logits and i == self.stage_count - 1)
                        for i, part in zip(ids, model.held_parts)]
        lanes = lanes and not isinstance(model, FSDPModule)
        self.ids, self.schedule_class, self.loss_fn = ids, _schedule_class(schedule, lanes), loss_fn
        self.pmesh, self.device = pmesh, device
        self._schedules: dict[int, object] = {}
        self._evaluations: dict[tuple, object] = {}
        self._before_backward: Callable[[bool], None] = lambda last: None
        """What this step's run was given (run), for every stage's StepStage."""
        self.weight_steps = WeightSteps()
        self._weight_steps_asked = defer_weight_gradients

    @property
    def defers_weight_gradients(self) -> bool:
        """Whether the schedule runs input and weight steps (SPLIT_BACKWARD) and is to give the weight steps the
        weight gradients (where the gradient sync holds its reduction: the caller's to say, run)."""
        return self._weight_steps_asked and issubclass(self.schedule_class, SPLIT_BACKWARD)

    @property
    def is_first(self) -> bool:
        return self.ids[0] == 0

    @property
    def is_last(self) -> bool:
        return self.ids[-1] == self.stage_count - 1

    def _stages(self, schedule_class) -> list[StepStage]:
        weight_steps = self.weight_steps if issubclass(schedule_class, SPLIT_BACKWARD) else None
        return [StepStage(module, i, self.stage_count, self.device, group=self.pmesh.pp_group,
                          before_backward=lambda last, i=i: self._stage_before_backward(i, last),
                          weight_steps=weight_steps)
                for i, module in zip(self.ids, self.modules)]

    def _stage_before_backward(self, stage: int, last: bool) -> None:
        """Before a backward of `stage`. A looped rank's stages share one FSDP root, and the gradient sync sets
        its flags on every unit of the rank: it hears `last` only in the rank's final backward, the lowest
        stage's last (the looped schedules end there); a stage's own units are then set to reduce and reshard
        in that stage's last backward, as every layout does in its last, so their reductions overlap the
        backwards still to run. The root (embedding, output layer), which every stage's forward enters, stays
        gathered until the final backward rather than being gathered again after each backward. Where the weight
        steps hold the reduction (weight_steps.defer), nothing is set: every unit reduces after the schedule."""
        if len(self.modules) == 1:
            self._before_backward(last)
            return
        final = last and stage == self.ids[0]
        self._before_backward(final)
        model = self.modules[0].model
        if not isinstance(model, FSDPModule) or self.weight_steps.defer:  # held: reduced after the schedule
            return
        model.set_reshard_after_backward(final, recurse=False)
        if last:
            for unit in self._units_of(self.ids.index(stage)):
                unit.set_requires_gradient_sync(True)
                unit.set_reshard_after_backward(True)

    def _units_of(self, position: int) -> list[FSDPModule]:
        """The FSDP units of this rank's `position`-th stage: its blocks (with their experts' units) and, on
        the model's last stage, the MTP depths."""
        model = self.modules[0].model
        units = [model.layers[i] for i in model.held_parts[position]]
        if self.is_last and position == len(self.modules) - 1:
            units += list(model.mtp)
        return [unit for unit in units if isinstance(unit, FSDPModule)]

    def _build(self, schedule_class, micro_batches: int):
        # scale_grads off: the loss is already the share of the global batch's mean (trainer/step.py).
        stages = self._stages(schedule_class)
        if len(stages) > 1:
            return schedule_class(stages, micro_batches, loss_fn=self.loss_fn, scale_grads=False)
        return schedule_class(stages[0], micro_batches, loss_fn=self.loss_fn, scale_grads=False)

    def _schedule(self, micro_batches: int):
        if micro_batches not in self._schedules:
            self._schedules[micro_batches] = self._build(self.schedule_class, micro_batches)
        return self._schedules[micro_batches]

    def _evaluation(self, micro_batches: int, shape: tuple[int, ...]):
        """A forward-only schedule for held-out batches, on stages of its own: torch fixes the shapes a stage
        sends at its first step, and held-out rows need not have the training micro-batch's."""
        key = (micro_batches, shape)
        if key not in self._evaluations:
            placed = _VForwards if issubclass(self.schedule_class, tuple(V_SCHEDULES.values())) else \
                ScheduleLoopedBFS if len(self.modules) > 1 else ScheduleGPipe
            self._evaluations[key] = self._build(placed, micro_batches)
        return self._evaluations[key]

    def run(self, micro_batches: int, tokens_BT: Tensor, target: Tensor, segment_BT: Optional[Tensor],
            train: bool = True, before_backward: Callable[[bool], None] = lambda last: None,
            defer_weight_gradients: bool = False) -> list[StageForward]:
        """Forward (and backward, when `train`) of `micro_batches` equal slices of the rows: the first stage
        feeds `tokens_BT`, the last computes loss_fn(its output, slice of `target`); every stage gets its
        slice of `segment_BT`; `before_backward(last)` before each backward (StepStage);
        `defer_weight_gradients` (only where defers_weight_gradients, and the caller's gradient sync holds its
        reduction until it releases it after the run): the weight steps compute the weight gradients
        (WeightSteps), and `before_backward` hears no backward is the last. Returns this rank's reports, per
        stage, one per micro-batch."""
        defer = defer_weight_gradients
        assert not defer or self.defers_weight_gradients, "deferring needs a split-backward schedule that defers"
        for module in self.modules:
            module.router_scale, module.forwards = 1.0 / micro_batches, []
        self._before_backward = (lambda last: before_backward(False)) if defer else before_backward
        self.weight_steps.defer, self.weight_steps.ran, self.weight_steps.queued = defer, 0, []
        args = (tokens_BT,) if self.is_first else ()
        kwargs = {"segment_BT": segment_BT} if segment_BT is not None else {}
        if train and self.modules[0].model.cfg.mtp_layers:  # the last stage's MTP depths embed the tokens
            kwargs["tokens_BT"] = tokens_BT
        if train:
            with splitting_backward(defer):
                self._schedule(micro_batches).step(*args, target=target if self.is_last else None,
                                                   return_outputs=False, **kwargs)
        else:
            self._evaluation(micro_batches, tuple(tokens_BT.shape)).eval(
                *args, target=target if self.is_last else None, **kwargs)
        forwards = []
        for module in self.modules:  # a schedule's first step infers shapes first (INFERRED_FORWARDS): the
            forwards += module.forwards[-micro_batches:]  # step's own forwards are each stage's last ones
            module.forwards = []
        return forwards
