"""The held-out loss of an SFT run, on its own cadence: every sft.eval_every steps and at the last one."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from moeyard.models import Transformer
from moeyard.parallel import ParallelMesh
from moeyard.trainer.config.sections import Config
from moeyard.trainer.data.sft_batches import SFTBatch
from moeyard.trainer.step import heldout_loss

if TYPE_CHECKING:  # trainer.step.pipeline_for imports it, only with parallel.pp > 1
    from moeyard.parallel.pipeline import Pipeline


class Evaluator:
    """Collective: every rank evaluates the same steps, each on its share of the held-out examples
    (`heldout`; None for pretraining, which has none)."""

    def __init__(self, cfg: Config, heldout: Optional[SFTBatch], last: int, model: Transformer, pmesh: ParallelMesh,
                 micro_batch_size: int, dtype: torch.dtype, pipeline: Optional[Pipeline] = None) -> None:
        self.heldout, self.every, self.last = heldout, cfg.sft.eval_every, last
        self.model, self.pmesh, self.micro_batch_size, self.dtype = model, pmesh, micro_batch_size, dtype
        self.pipeline = pipeline
        self.loss_chunk_tokens = cfg.train.loss_chunk_tokens

    def due(self, step: int) -> bool:
        return self.heldout is not None and (step == self.last or bool(self.every and step % self.every == 0))

    def after_step(self, step: int) -> tuple[Optional[float], Optional[float]]:
        """(held-out loss, fraction of expert computations skipped) after `step`, or (None, None) when not due."""
        if not self.due(step):
            return None, None
        return heldout_loss(self.model, self.heldout, micro_batch_size=self.micro_batch_size, pmesh=self.pmesh,
                            dtype=self.dtype, loss_chunk_tokens=self.loss_chunk_tokens, pipeline=self.pipeline)
