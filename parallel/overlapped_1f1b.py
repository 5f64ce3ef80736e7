"""schedule.pipeline=overlapped_1f1b: 1F1B whose steady state runs one micro-batch's forward beside another's
backward, so that each one's all-to-alls travel while the other computes (Megatron-Core's combined 1F1B,
DualPipe's overlap); and schedule.pipeline=dualpipev with replicated stages, whose paired forward and backward
run the same way. The backward runs in a second thread, the backward lane (parallel/lanes.py).

Built on torch's own runtime schedules (`_PipelineScheduleRuntime`, private in torch 2.13, and DualPipeV on
it): their OVERLAP_F_B action, whose sub-actions torch runs one after the other unless a function is registered
for it; the one registered here runs them at once. parallel/pipeline.py imports this module only for these
schedules.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    ScheduleDualPipeV,
    _Action,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _wait_batch_p2p,
)

from moeyard.parallel.lanes import in_backward_lane, traced


class _Lanes:
    """Runs each OVERLAP_F_B action of a torch runtime schedule with its forward in this thread and its backward
    in the backward lane, on any of the rank's stages (in a V, a rank's two stages hand activations and
    gradients to each other without a send, as torch's own runtime does)."""

    def _start_lanes(self, name: str) -> None:
        self._held = {stage.stage_index: stage for stage in self._stages}  # this rank's stages, by index
        self.register_custom_function(OVERLAP_F_B, self._overlap)
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="moeyard-backward-lane")
        if self._stages[0].device.type == "cuda" and dist.get_rank() == 0:
            print(f"warning: schedule.pipeline={name} has never run on a GPU; there its two lanes share one CUDA "
                  f"stream, so their all-to-alls do not overlap yet (parallel/overlapped_1f1b.py)", flush=True)

    def _receive(self, action: _Action) -> None:
        """Wait for what the action needs from the neighbouring stage (its activation, or its gradient), unless
        that stage is on this rank."""
        index, mb = action.stage_index, action.microbatch_index
        stage = self._held[index]
        if action.computation_type == FORWARD and not stage.is_first and index - 1 not in self._held:
            _wait_batch_p2p(self.fwd_recv_ops.pop((index, mb)))
        if action.computation_type == FULL_BACKWARD and not stage.is_last and index + 1 not in self._held:
            _wait_batch_p2p(self.bwd_recv_ops.pop((index, mb)))

    def _forward(self, action: _Action, ctx: _PipelineContext) -> None:
        # As the runtime's own forward with what Pipeline.run steps with: return_outputs=False, no loss kwargs.
        index, mb = action.stage_index, action.microbatch_index
        stage = self._held[index]
        with traced("micro-batch"):
            output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
            self._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
        if index + 1 in self._held:
            self._held[index + 1].set_local_fwd_input(output, mb)

    def _backward(self, action: _Action, last: bool) -> None:
        index, mb = action.stage_index, action.microbatch_index
        stage = self._held[index]
        with traced("micro-batch"):
            stage.backward_one_chunk(mb, loss=self._maybe_get_loss(stage, mb), full_backward=True,
                                     last_backward=last)
        if index - 1 in self._held:
            self._held[index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

    def _overlap(self, action: _Action, ctx: _PipelineContext) -> None:
        """Both micro-batches start together, once both inputs are here: their sends follow the pair, so
        starting one early would gain nothing and leave the other's all-to-alls with nothing to hide behind."""
        forward, backward = action.sub_actions
        self._receive(forward)
        self._receive(backward)
        index = backward.stage_index
        self.backward_counter[index] += 1
        pending = self._lane.submit(in_backward_lane, self._backward, backward,
                                    self.backward_counter[index] == self._n_microbatches)
        try:
            self._forward(forward, ctx)
        except BaseException:
            pending.exception()  # let the backward end first; the forward's error is the one raised
            raise
        pending.result()  # the backward's error, if any, is raised here


class OverlappedOneFOneB(_Lanes, _PipelineScheduleRuntime):
    """The forward in this thread, the backward in the backward lane. Stage s of pp warms up with pp - s
    forwards (one more than 1F1B: the last stage too must have a finished forward to pair with the next),
    then runs (forward i + pp - s, backward i) pairs, then the remaining backwards."""

    def __init__(self, stage: PipelineStage, n_microbatches: int, loss_fn: Callable, scale_grads: bool) -> None:
        super().__init__([stage], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        self.pipeline_order = {r: self.actions(r, self.pp_group_size, n_microbatches)
                               for r in range(self.pp_group_size)}
        self._prepare_schedule_with_comms(self.pipeline_order)
        self._start_lanes("overlapped_1f1b")

    @staticmethod
    def actions(stage: int, stages: int, micro_batches: int) -> list[Optional[_Action]]:
        """What stage `stage` of `stages` runs (one stage per rank: stage = rank), compute only."""
        warmup = min(stages - stage, micro_batches)
        out: list[Optional[_Action]] = [_Action(stage, FORWARD, i) for i in range(warmup)]
        for i in range(micro_batches - warmup):
            out.append(_Action(-1, OVERLAP_F_B, None, (_Action(stage, FORWARD, warmup + i),
                                                       _Action(stage, FULL_BACKWARD, i))))
        out += [_Action(stage, FULL_BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]
        return out


class OverlappedDualPipeV(_Lanes, ScheduleDualPipeV):
    """torch's DualPipeV with its paired forward and backward (of two micro-batches, on the rank's two stages)
    run side by side, each one's all-to-alls behind the other's compute: DualPipe's overlap, which torch runs
    one after the other unless a function is registered for it."""

    def __init__(self, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable,
                 scale_grads: bool) -> None:
        super().__init__(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        self._start_lanes("dualpipev")
