"""One optimizer step: micro-batches forward/backward, gradient reduction, clip, AdamW.

Loss scaling makes every layout train the same model: a rank's language-model
loss is its token-loss *sum* times dp / (global tokens), so averaging gradients
over dp yields the gradient of the global batch's mean loss. Router losses are
already means; they are divided by the number of micro-steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeyard.models import ModelOutput, Transformer
from moeyard.models.device_copy import to_device
from moeyard.models.document_attention import DocumentSpans
from moeyard.models.peft.adapters import AdapterStats, has_adapter, recording_adapters, with_adapter_losses
from moeyard.parallel import ParallelMesh
from moeyard.parallel.fsdp import reshard
from moeyard.parallel.grads.sync import GradSync
from moeyard.parallel.parallelize import reset_traffic, take_cross_machine_bytes
from moeyard.trainer.config.sections import Config
from moeyard.trainer.data.blend import TokenBatch
from moeyard.trainer.data.sft_batches import SFTBatch
from moeyard.trainer.losses import chunked_lm_loss_sum, lm_loss_sum, mtp_loss_sum
from moeyard.trainer.stats import StepStats

if TYPE_CHECKING:  # imported where a pipeline is built: torch's pipelining imports dynamo, 0.8 s of
    # every worker's start, needed only with parallel.pp > 1
    from moeyard.parallel.pipeline import Pipeline


@dataclass(frozen=True)
class StepResult:
    loss: float
    """lm_loss + aux_loss + z_loss (+ model.mtp_loss_coef * mtp_loss) of the global batch: the objective."""
    lm_loss: float
    aux_loss: float
    """Weighted load-balancing loss, summed over MoE layers."""
    z_loss: float
    """Weighted router z-loss, summed over MoE layers."""
    grad_norm: float
    """Before clipping."""
    tokens: int
    """Tokens in the global batch."""
    expert_load: dict[int, list[int]]
    """Per MoE layer: token copies routed to each expert over the global batch."""
    dropped_fraction: dict[int, float]
    """Per MoE layer: fraction of routed copies dropped for capacity."""
    unrouted_fraction: dict[int, float]
    """Per MoE layer: fraction of tokens that reached no routed expert (expert_choice, or capacity drops)."""
    router: dict[int, dict[str, float | list[float]]]
    """Per MoE layer: unweighted aux and z loss and router entropy of the global batch, plus the router's
    own state as this step's forward used it (e.g. sigmoid_bias's expert biases)."""
    adapter_routers: dict[str, dict[str, float | list[float]]] = field(default_factory=dict)
    """Per routed adapter (model.peft): copies sent to each adapter over the global batch, its unweighted
    balance loss and router entropy (the metrics of the MoE routers)."""
    mtp_loss: Optional[float] = None
    """Multi-token prediction (model.mtp_layers): the mean over depths of each depth's summed target loss,
    divided by the main loss's target count (a depth has k fewer targets per row; None without MTP)."""
    skipped: bool = False
    """The loss or a gradient was NaN/inf: parameters and optimizer state were left unchanged."""


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class MicroBatch:
    tokens_BT1: Tensor
    mask_BT: Optional[Tensor] = None
    """Which targets count (SFT); None: all."""
    segment_BT1: Optional[Tensor] = None
    """Document of each token (packed SFT rows, data.document_mask); None: one document per row."""
    docs: Optional[DocumentSpans] = None
    """The documents' spans, built from the host's segment ids (no device-to-host copy in the forward)."""


def _micro_batches(batch: Tensor | TokenBatch | SFTBatch, micro_batch_size: int,
                   device: torch.device) -> list[MicroBatch]:
    """The share cut into micro-batches on `device`."""
    if isinstance(batch, Tensor):
        batch = TokenBatch(batch)
    mask = batch.mask_BT if isinstance(batch, SFTBatch) else None
    micro = []
    for a in range(0, batch.tokens_BT1.shape[0], micro_batch_size):
        rows = slice(a, a + micro_batch_size)
        segment = None if batch.segment_BT1 is None else batch.segment_BT1[rows]
        micro.append(MicroBatch(
            to_device(batch.tokens_BT1[rows], device),
            None if mask is None else to_device(mask[rows], device),
            None if segment is None else to_device(segment, device),
            None if segment is None else DocumentSpans.from_segments(segment[:, :-1], device)))
    return micro


@dataclass(frozen=True)
class MicroLoss:
    """One micro-batch's forward and the sums the step's objective is made of."""
    out: ModelOutput
    lm_sum: Tensor
    """Summed next-token loss over the micro-batch's learned targets."""
    mtp_sum: Optional[Tensor]
    """mtp_loss_sum of the MTP depths (None without them, or when not asked for)."""
    adapter_stats: dict[str, AdapterStats]
    """What each routed adapter (model.peft) reported, keyed by its module name."""
    aux_loss: Tensor
    """The weighted balance losses: the MoE layers' (out.aux_loss), then the routed adapters'."""

    @property
    def router_loss(self) -> Tensor:
        return self.aux_loss + self.out.z_loss


def forward_and_loss(model: Transformer, micro: MicroBatch, dtype: torch.dtype, loss_chunk_tokens: int = 0,
                     mtp: bool = False) -> MicroLoss:
    """The model's forward on a micro-batch and its losses; `mtp` runs the MTP depths too. With
    `loss_chunk_tokens`, the output layer runs a chunk at a time (not when it carries an adapter, which
    reports through the recorded forward)."""
    chunk = 0 if has_adapter(model.output) else loss_chunk_tokens
    tokens_BT1, mask_BT = micro.tokens_BT1, micro.mask_BT
    segment_BT = None if micro.segment_BT1 is None else micro.segment_BT1[:, :-1]
    with autocast_context(tokens_BT1.device, dtype):
        with recording_adapters() as adapter_stats:
            out = model(tokens_BT1[:, :-1], segment_BT, logits=chunk <= 0, docs=micro.docs, mtp=mtp)
        if chunk > 0:
            lm_sum = chunked_lm_loss_sum(model.output, out.hidden_BTD, tokens_BT1[:, 1:], mask_BT, chunk)
        else:
            lm_sum = lm_loss_sum(out.logits_BTV, tokens_BT1[:, 1:], mask_BT)
        mtp_sum = mtp_loss_sum(model.output, out.mtp_hidden, tokens_BT1, mask_BT, segment_BT, chunk) \
            if out.mtp_hidden else None
    aux_loss = with_adapter_losses(out.aux_loss, adapter_stats, model.cfg.peft.aux_loss_coef)
    return MicroLoss(out, lm_sum, mtp_sum, adapter_stats, aux_loss)


class LastStageLoss:
    """The loss torch's pipeline schedule calls on the last stage's output, one micro-batch at a time: the
    summed next-token (and MTP) loss scaled as the step's objective scales it (the router losses ride on the
    output, parallel/pipeline.py). `target` is the rows [B, T + 1] of token ids, or [B, 3, T + 1]: token ids,
    the loss mask (shifted to the target positions: column 0 unused) and the segments (_pipeline_inputs).
    Every stage's schedule is given one (torch's schedules run a backward only when they have a loss); only
    the last stage's, whose `output` is the output layer, is called."""

    def __init__(self, output: Optional[nn.Linear], loss_chunk_tokens: int, mtp_loss_coef: float) -> None:
        self.output, self.mtp_loss_coef = output, mtp_loss_coef
        self.chunk = 0 if has_adapter(output) else loss_chunk_tokens
        self.lm_scale = 1.0
        self.has_mask = self.has_segments = False
        """What the packed target carries this step."""
        self.sums: list[tuple[Tensor, Optional[Tensor]]] = []
        """Each micro-batch's summed loss and MTP loss (no gradient), for the step's statistics."""

    def __call__(self, out: Tensor | tuple[Tensor, ...], target: Tensor) -> Tensor:
        y, mtp_hidden = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, ())
        tokens_BT1 = target if target.dim() == 2 else target[:, 0]
        mask_BT = target[:, 1, 1:].bool() if self.has_mask else None
        segment_BT = target[:, 2, :-1] if self.has_segments else None
        if self.chunk > 0:  # y: the normed hidden states
            lm_sum = chunked_lm_loss_sum(self.output, y, tokens_BT1[:, 1:], mask_BT, self.chunk)
        else:  # y: the logits
            lm_sum = lm_loss_sum(y, tokens_BT1[:, 1:], mask_BT)
        mtp_sum = mtp_loss_sum(self.output, mtp_hidden, tokens_BT1, mask_BT, segment_BT, self.chunk) \
            if mtp_hidden else None
        self.sums.append((lm_sum.detach(), None if mtp_sum is None else mtp_sum.detach()))
        if mtp_sum is None:
            return lm_sum * self.lm_scale
        return lm_sum * self.lm_scale + self.mtp_loss_coef * mtp_sum * self.lm_scale


def pipeline_for(model: Transformer, pmesh: ParallelMesh, cfg: Config, device: torch.device) -> Pipeline:
    """The pipeline of this rank's stage (the model reduced to it by parallel.pipeline.keep_this_stage), as the
    run's schedule section says."""
    from moeyard.parallel.pipeline import Pipeline

    loss = LastStageLoss(model.output, cfg.train.loss_chunk_tokens, model.cfg.mtp_loss_coef)  # None before the last
    return Pipeline(model, pmesh, cfg.schedule.pipeline, device, model.output is not None and loss.chunk <= 0, loss,
                    cfg.lanes, cfg.schedule.defer_weight_gradients)


def _pipeline_inputs(batch: Tensor | TokenBatch | SFTBatch, device: torch.device, loss: LastStageLoss
                     ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The whole share's inputs [B, T], the last stage's packed target (LastStageLoss) and the segments."""
    if isinstance(batch, Tensor):
        batch = TokenBatch(batch)
    tokens_BT1 = to_device(batch.tokens_BT1, device)
    segment_BT1 = None if batch.segment_BT1 is None else to_device(batch.segment_BT1, device)
    loss.has_mask, loss.has_segments = isinstance(batch, SFTBatch), segment_BT1 is not None
    target = tokens_BT1
    if loss.has_mask or loss.has_segments:
        mask_BT1 = torch.zeros_like(tokens_BT1)
        if loss.has_mask:
            mask_BT1[:, 1:] = to_device(batch.mask_BT, device)
        target = torch.stack([tokens_BT1, mask_BT1, tokens_BT1 if segment_BT1 is None else segment_BT1], dim=1)
    return tokens_BT1[:, :-1], target, None if segment_BT1 is None else segment_BT1[:, :-1]


def _pipelined_micro_steps(pipeline: Pipeline, sync: GradSync, batch: Tensor | TokenBatch | SFTBatch,
                           micro_batches: int, lm_scale: float, dtype: torch.dtype, device: torch.device,
                           stats: StepStats) -> None:
    """Forward and backward of every micro-batch through the stages, as the schedule orders them (`sync` told
    before each backward whether it is the last: Pipeline._stage_before_backward; under a zero-bubble schedule
    whose sync can hold its reduction, never, and the reduction released once the weight steps have run); this
    stage's losses and router statistics into `stats`."""
    loss = pipeline.loss_fn
    tokens_BT, target, segment_BT = _pipeline_inputs(batch, device, loss)
    loss.lm_scale, loss.sums = lm_scale, []
    held = pipeline.defers_weight_gradients and sync.holds_reduction  # weight steps add after the last input step
    with autocast_context(device, dtype):
        forwards = pipeline.run(micro_batches, tokens_BT, target, segment_BT, before_backward=sync.begin_micro_step,
                                defer_weight_gradients=held)
    if held:
        sync.release_reduction()
    for f in forwards:
        stats.add_forward(f.moe_stats, f.adapter_stats, f.aux_loss, f.z_loss)
    for lm_sum, mtp_sum in loss.sums[-micro_batches:]:  # the last stage's (parallel.pipeline.INFERRED_FORWARDS)
        stats.add_lm(lm_sum, mtp_sum)


def train_step(model: Transformer, sync: GradSync, batch: Tensor | TokenBatch | SFTBatch, *, micro_batch_size: int,
               pmesh: ParallelMesh, lr: float, grad_clip: float, dtype: torch.dtype,
               loss_chunk_tokens: int = 0, pipeline: Optional[Pipeline] = None) -> StepResult:
    """`batch` is this rank's share of the global batch: [sequences, seq_len + 1] token ids, or SFT rows
    whose loss counts the masked targets only and whose examples attend only within themselves. With
    `pipeline`, `model` is this rank's stage and the schedule runs the micro-batches."""
    device = next(model.parameters()).device
    rows, seq_len = (batch if isinstance(batch, Tensor) else batch.tokens_BT1).shape
    seq_len -= 1
    micro_steps = -(-rows // micro_batch_size)
    global_tokens = rows * seq_len * pmesh.dp
    global_targets = max(1, batch.global_targets) if isinstance(batch, SFTBatch) else global_tokens
    lm_scale = pmesh.dp / global_targets

    sync.zero_grad()
    reset_traffic(model)
    stats = StepStats()
    if pipeline is not None:  # the schedule cuts the share and runs every micro-step's backward
        from moeyard.parallel.pipeline import sum_copied_gradients

        _pipelined_micro_steps(pipeline, sync, batch, micro_steps, lm_scale, dtype, device, stats)
        sum_copied_gradients(model, pmesh)
    else:
        for i, micro in enumerate(_micro_batches(batch, micro_batch_size, device)):
            sync.begin_micro_step(last=i == micro_steps - 1)  # earlier micro-steps only accumulate
            loss = forward_and_loss(model, micro, dtype, loss_chunk_tokens, mtp=True)
            objective = loss.lm_sum * lm_scale + loss.router_loss / micro_steps
            if loss.mtp_sum is not None:  # scaled like the main loss: by the main loss's global target count
                objective = objective + model.cfg.mtp_loss_coef * loss.mtp_sum * lm_scale
            objective.backward()
            stats.add_lm(loss.lm_sum, loss.mtp_sum)
            stats.add_forward(loss.out.moe_stats, loss.adapter_stats, loss.aux_loss, loss.out.z_loss)

    grad_norm = sync.reduce()  # waits for (or runs) the gradient reduction
    for layer, sent in take_cross_machine_bytes(model, device).items():
        stats.per_rank.add(f"{layer}.cross_machine_bytes", sent)
    stats.all_reduce(pmesh.dp_group)  # global losses: the same on every rank, like the norm
    # Router state as this step's forward used it (before the update below).
    router_state = {layer: moe.router.extra_metrics() for layer, moe in model.moe_layers()}
    if pmesh.pp_group is not None:  # every stage sees every stage's numbers, and takes the same decision
        router_state = stats.merge_stages(pmesh.pp_group, router_state)
    finite = stats.losses_finite() and bool(torch.isfinite(grad_norm))
    if finite:  # every rank takes the same decision from the same numbers
        sync.apply(lr, grad_clip, grad_norm)
        for layer, moe in model.moe_layers():  # stateful routers (biases, schedules) follow the global load
            moe.router.step_done(stats.expert_load(layer))
    report = stats.report(micro_steps=pmesh.dp * micro_steps, global_targets=global_targets,
                          global_tokens=global_tokens, router_state=router_state)
    objective = report["lm_loss"] + report["aux_loss"] + report["z_loss"]
    if "mtp_loss" in report:
        objective += model.cfg.mtp_loss_coef * report["mtp_loss"]
    return StepResult(loss=objective, grad_norm=grad_norm.item(), tokens=global_tokens, skipped=not finite, **report)


def skip_counts(moe_stats: dict) -> Tensor:
    """[skipped copies, all copies] over the MoE layers of one forward (copies before skipping; the routed
    counts include copies later dropped for capacity); zeros for a forward without MoE layers (a dense
    pipeline stage)."""
    if not moe_stats:
        return torch.zeros(2, dtype=torch.float64)
    skipped = sum(stats.skipped for stats in moe_stats.values())
    routed = sum(stats.tokens_per_expert_E.sum() for stats in moe_stats.values())
    return torch.stack([skipped, skipped + routed]).double()


@torch.no_grad()
def heldout_loss(model: Transformer, share: SFTBatch, *, micro_batch_size: int, pmesh: ParallelMesh,
                 dtype: torch.dtype, loss_chunk_tokens: int = 0,
                 pipeline: Optional[Pipeline] = None) -> tuple[float, float]:
    """Mean loss over the held-out targets of all ranks, and the fraction of expert computations (token
    copies) that expert skipping left out (model.moe.skip_threshold; 0 when off). Collective: every rank
    runs the same forwards (with `pipeline`, through the stages)."""
    device = next(model.parameters()).device
    total = torch.zeros(1, dtype=torch.float64, device=device)
    copies = torch.zeros(2, dtype=torch.float64, device=device)  # skipped, all (already summed over ranks)
    model.eval()
    try:
        if pipeline is None:
            for micro in _micro_batches(share, micro_batch_size, device):
                loss = forward_and_loss(model, micro, dtype, loss_chunk_tokens)
                total += loss.lm_sum.double()
                copies += skip_counts(loss.out.moe_stats)
        else:
            rows = share.tokens_BT1.shape[0]  # cut into equal micro-batches, as a pipeline needs
            size = max(d for d in range(1, min(micro_batch_size, rows) + 1) if rows % d == 0)
            tokens_BT, target, segment_BT = _pipeline_inputs(share, device, pipeline.loss_fn)
            pipeline.loss_fn.sums = []
            with autocast_context(device, dtype):
                forwards = pipeline.run(rows // size, tokens_BT, target, segment_BT, train=False)
            for lm_sum, _ in pipeline.loss_fn.sums[-(rows // size):]:  # the last stage's (INFERRED_FORWARDS)
                total += lm_sum.double()
            for f in forwards:
                copies += skip_counts(f.moe_stats).to(device)
    finally:
        model.train()
        reshard(model)  # units kept gathered after forward would otherwise stay so (no backward reshards them)
    dist.all_reduce(total, group=pmesh.dp_group)
    if pmesh.pp_group is not None:  # the loss is the last stage's, the skip counts each stage's own layers'
        dist.all_reduce(total, group=pmesh.pp_group)
        dist.all_reduce(copies, group=pmesh.pp_group)
    skipped, all_copies = copies.tolist()
    return float(total) / max(1, share.global_targets), skipped / max(1.0, all_copies)
