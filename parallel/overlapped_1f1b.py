"""schedule.pipeline=overlapped_1f1b: 1F1B whose steady state runs one micro-batch's forward beside another's
backward, so that each one's all-to-alls travel while the other computes (Megatron-Core's combined 1F1B,
DualPipe's overlap). The backward runs in a second thread, the backward lane (parallel/lanes.py).

Built on torch's own runtime schedule (`_PipelineScheduleRuntime`, private in torch 2.13): its OVERLAP_F_B
action, whose sub-actions torch runs one after the other unless a function is registered for it; the one
registered here runs them at once. parallel/pipeline.py imports this module only for this schedule.
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
    _Action,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _wait_batch_p2p,
)

from moeyard.parallel.lanes import in_backward_lane, traced


class OverlappedOneFOneB(_PipelineScheduleRuntime):
    """The forward in this thread, the backward in the backward lane. Stage s of pp warms up with pp - s
    forwards (one more than 1F1B: the last stage too must have a finished forward to pair with the next),
    then runs (forward i + pp - s, backward i) pairs, then the remaining backwards."""

    def __init__(self, stage: PipelineStage, n_microbatches: int, loss_fn: Callable, scale_grads: bool) -> None:
        super().__init__([stage], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        self.pipeline_order = {r: self.actions(r, self.pp_group_size, n_microbatches)
                               for r in range(self.pp_group_size)}
        self._prepare_schedule_with_comms(self.pipeline_order)
        self.register_custom_function(OVERLAP_F_B, self._overlap)
        self._lane = ThreadPoolExecutor(1, thread_name_prefix="moeyard-backward-lane")
        if stage.device.type == "cuda" and dist.get_rank() == 0:
            print("warning: schedule.pipeline=overlapped_1f1b has never run on a GPU; there its two lanes share one "
                  "CUDA stream, so their all-to-alls do not overlap yet (parallel/overlapped_1f1b.py)", flush=True)

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

    def _receive(self, action: _Action) -> None:
        """Wait for what the action needs from the neighbouring stage (its activation, or its gradient)."""
        stage, mb = self._stages[0], action.microbatch_index
        if action.computation_type == FORWARD and not stage.is_first:
            _wait_batch_p2p(self.fwd_recv_ops.pop((stage.stage_index, mb)))
        if action.computation_type == FULL_BACKWARD and not stage.is_last:
            _wait_batch_p2p(self.bwd_recv_ops.pop((stage.stage_index, mb)))

    def _forward(self, action: _Action, ctx: _PipelineContext) -> None:
        # As the runtime's own forward with what Pipeline.run steps with: return_outputs=False, no loss kwargs.
        stage, mb = self._stages[0], action.microbatch_index
        with traced("micro-batch"):
            output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
            self._maybe_compute_loss(stage, output, ctx.target_mbs, mb)

    def _backward(self, action: _Action, last: bool) -> None:
        stage, mb = self._stages[0], action.microbatch_index
        with traced("micro-batch"):
            stage.backward_one_chunk(mb, loss=self._maybe_get_loss(stage, mb), full_backward=True,
                                     last_backward=last)

    def _overlap(self, action: _Action, ctx: _PipelineContext) -> None:
        """Both micro-batches start together, once both inputs are here: their sends follow the pair, so
        starting one early would gain nothing and leave the other's all-to-alls with nothing to hide behind."""
        forward, backward = action.sub_actions
        self._receive(forward)
        self._receive(backward)
        index = self._stages[0].stage_index
        self.backward_counter[index] += 1
        pending = self._lane.submit(in_backward_lane, self._backward, backward,
                                    self.backward_counter[index] == self._n_microbatches)
        try:
            self._forward(forward, ctx)
        except BaseException:
            pending.exception()  # let the backward end first; the forward's error is the one raised
            raise
        pending.result()  # the backward's error, if any, is raised here
