"""What a step with a NaN/inf loss or gradient does to the run: train.nonfinite=skip skips it (up to
train.max_skipped_steps in a row), stop saves the last good state, marks run.dir and stops."""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from moeyard.errors import NonFiniteStop
from moeyard.parallel.grads.sync import GradSync
from moeyard.trainer.checkpoint.sharded import Checkpointer
from moeyard.trainer.config.sections import Config
from moeyard.trainer.run_dir import mark_stopped_nonfinite
from moeyard.trainer.step import StepResult


class NonFiniteGuard:
    """Counts skipped steps and stops the run when it must. Collective (every rank sees the same results)."""

    def __init__(self, cfg: Config, checkpointer: Checkpointer) -> None:
        self.cfg, self.checkpointer = cfg, checkpointer
        self.in_a_row = 0
        self.total = 0
        """Steps skipped by this launch."""

    def count(self, result: StepResult) -> None:
        self.in_a_row = self.in_a_row + 1 if result.skipped else 0
        self.total += result.skipped

    def stop_if_due(self, step: int, result: StepResult, model: nn.Module, sync: GradSync) -> None:
        """Raises NonFiniteStop when `step` (counted) was skipped and the run may not go on."""
        if result.skipped and (self.cfg.train.nonfinite == "stop" or self.in_a_row >= self.cfg.train.max_skipped_steps):
            raise self._stop(step, result, model, sync)

    def _stop(self, step: int, result: StepResult, model: nn.Module, sync: GradSync) -> NonFiniteStop:
        """The update was not applied: parameters and optimizer state are the last good ones; keep them."""
        saved = f"saved the last good state as step {step - 1}"
        if step - 1 > self.checkpointer.last_saved_step():
            self.checkpointer.save(step - 1, model, sync)
        elif step - 1 == 0:
            saved = "no step had succeeded, so there is nothing to save"
        else:
            saved = f"the last good state is the checkpoint of step {step - 1}"
        message = (f"non-finite loss or gradient at step {step} (loss {result.loss}, grad norm {result.grad_norm}); "
                   f"{saved}. Lower optim.lr or raise train.grad_clip, or set train.nonfinite=skip")
        if dist.get_rank() == 0:
            mark_stopped_nonfinite(self.cfg.run_dir, step, message)
        return NonFiniteStop(message)
