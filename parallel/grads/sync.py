"""Gradient synchronisation + optimizer step, one strategy per plan.

  PlainSync        reference: one reduction per group after backward, torch AdamW.
  OverlappedSync   bucketed all-reduce launched from backward hooks, torch AdamW.
  ShardedSync      bucketed reduce-scatter from backward hooks, ZeRO sharded AdamW,
                   parameters all-gathered after the step.
  FullyShardedSync torch FSDP2 (`parallel.fsdp`): reduce-scatter per unit in backward, torch
                   AdamW on the DTensor shards; parameters gathered per unit when used, or
                   once per step (gather_once: unsharded through the micro-steps).
All four give the same update; tests compare them.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moeyard.parallel.fsdp import reduce_gathered, set_gather_once
from moeyard.parallel.grads.buckets import BucketedReducer
from moeyard.parallel.grads.reduce import (
    ParamGroups,
    clip_gradients,
    global_grad_norm,
    norm_over_stages,
    reduce_gradients,
    scale_,
    squared_norm,
)
from moeyard.parallel.grads.zero import ShardedAdamW
from moeyard.parallel.mesh import ParallelMesh


class GradSync(Protocol):
    holds_reduction: bool
    """Whether the reduction can wait until a zero-bubble schedule's weight steps have added to the gradients
    after their input steps (parallel/pipeline.py WeightSteps): replicated stages reduce after the whole
    backward anyway; fsdp gathered once and reducing once holds its units' reduce-scatters for
    release_reduction. The bucketed and ZeRO syncs reduce from hooks on gradients, as do fsdp units reducing
    in every micro-step."""

    def begin_micro_step(self, last: bool) -> None:
        """Before each micro-step's backward; only the last one reduces."""
        ...

    def release_reduction(self) -> None:
        """After a schedule that told every backward it was not the last (holds_reduction): what the last
        would have reduced, reduced now."""
        ...

    def reduce(self) -> Tensor:
        """Finish the gradient reduction; returns the global gradient norm (the same on every rank)."""
        ...

    def apply(self, lr: float, grad_clip: float, norm: Tensor) -> None:
        """Clip to `grad_clip` (0: off) and update the parameters."""
        ...

    def zero_grad(self) -> None: ...

    def param_states(self) -> dict[int, dict[str, Tensor]]:
        """Optimizer state per parameter id, unsharded, in torch.optim.AdamW's keys."""
        ...

    def load_param_states(self, states: dict[int, dict[str, Tensor]]) -> None:
        """The inverse of param_states (after a checkpoint load)."""
        ...


class PlainSync:
    holds_reduction = True  # reduce() reduces, after the whole backward

    def __init__(self, groups: ParamGroups, pmesh: ParallelMesh, optimizer: torch.optim.Optimizer,
                 reduce_dtype: torch.dtype = torch.float32) -> None:
        self.groups, self.pmesh, self.optimizer = groups, pmesh, optimizer
        self.reduce_dtype = reduce_dtype

    def begin_micro_step(self, last: bool) -> None:
        pass

    def release_reduction(self) -> None:
        pass

    def _reduce(self) -> None:
        reduce_gradients(self.groups, self.pmesh, self.reduce_dtype)

    def reduce(self) -> Tensor:
        self._reduce()
        return global_grad_norm(self.groups, self.pmesh)

    def apply(self, lr: float, grad_clip: float, norm: Tensor) -> None:
        clip_gradients(self.groups, norm, grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def param_states(self) -> dict[int, dict[str, Tensor]]:
        return {id(p): dict(state) for p, state in self.optimizer.state.items()}

    def load_param_states(self, states: dict[int, dict[str, Tensor]]) -> None:
        moments = getattr(self.optimizer, "moment_dtype", None)  # LowPrecisionMomentsAdamW's
        for p in self.groups.dense + self.groups.expert:
            if id(p) in states:
                self.optimizer.state[p] = {k: v.to(moments if moments and k != "step" else v.dtype, copy=True)
                                           for k, v in states[id(p)].items()}


class OverlappedSync(PlainSync):
    holds_reduction = False  # its buckets reduce when their gradients are accumulated

    def __init__(self, groups: ParamGroups, pmesh: ParallelMesh, optimizer: torch.optim.Optimizer,
                 reducer: BucketedReducer) -> None:
        super().__init__(groups, pmesh, optimizer)
        self.reducer = reducer

    def begin_micro_step(self, last: bool) -> None:
        self.reducer.sync = last

    def release_reduction(self) -> None:
        raise AssertionError("OverlappedSync reduces from hooks on gradients: it holds no reduction")

    def _reduce(self) -> None:
        self.reducer.finish()


class ShardedSync:
    holds_reduction = False  # as OverlappedSync

    def __init__(self, groups: ParamGroups, pmesh: ParallelMesh, reducer: BucketedReducer,
                 optimizer: ShardedAdamW) -> None:
        self.groups, self.pmesh, self.reducer, self.optimizer = groups, pmesh, reducer, optimizer

    def begin_micro_step(self, last: bool) -> None:
        self.reducer.sync = last

    def release_reduction(self) -> None:
        raise AssertionError("ShardedSync reduces from hooks on gradients: it holds no reduction")

    def reduce(self) -> Tensor:
        self.reducer.finish()
        # Dense shards partition the dense gradient over dp; expert shards partition each ep rank's
        # experts over edp, and ep ranks hold disjoint experts: one sum over dp covers everything once.
        sq = self.optimizer.grad_sq_sum()
        dist.all_reduce(sq, group=self.pmesh.dp_group)
        return norm_over_stages(sq, self.pmesh)

    def apply(self, lr: float, grad_clip: float, norm: Tensor) -> None:
        if grad_clip > 0:
            self.optimizer.scale_grads((grad_clip / (norm + 1e-6)).clamp(max=1.0))
        self.optimizer.lr = lr
        self.optimizer.step()

    def zero_grad(self) -> None:
        for p in self.groups.dense + self.groups.expert:
            p.grad = None

    def param_states(self) -> dict[int, dict[str, Tensor]]:
        return self.optimizer.full_states()

    def load_param_states(self, states: dict[int, dict[str, Tensor]]) -> None:
        self.optimizer.load_full_states(states)


def _local(t: Tensor) -> Tensor:
    """This rank's piece of a DTensor (a view: in-place changes reach the DTensor); a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


class FullyShardedSync(PlainSync):
    """FSDP2 (see parallel.fsdp) reduces every micro-step's gradients as backward runs and accumulates
    them sharded -- or, given `gather_once_model` (the model apply_fsdp made, its units kept gathered
    after forward), keeps them unsharded until the last micro-step reduces them once; what is left after
    backward is the norm, the clip and AdamW on each rank's shards."""

    def __init__(self, groups: ParamGroups, pmesh: ParallelMesh, optimizer: torch.optim.Optimizer,
                 gather_once_model: Optional[nn.Module] = None, reduce_once: bool = True) -> None:
        super().__init__(groups, pmesh, optimizer)
        self.gather_once_model, self.reduce_once = gather_once_model, reduce_once

    @property
    def holds_reduction(self) -> bool:
        """Gathered once and reducing once: the units accumulate unsharded gradients until told to reduce (a
        unit otherwise reduces when its input gradient is computed)."""
        return self.gather_once_model is not None and self.reduce_once

    def begin_micro_step(self, last: bool) -> None:
        if self.gather_once_model is not None:
            set_gather_once(self.gather_once_model, last, self.reduce_once)

    def release_reduction(self) -> None:
        assert self.holds_reduction, "only a sync that holds its reduction releases it"
        reduce_gathered(self.gather_once_model)

    def _grads(self) -> list[Tensor]:
        # A shard whose experts saw no rows joins AdamW with a zero gradient, as in the replicated path.
        for p in self.groups.dense + self.groups.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [_local(p.grad) for p in self.groups.dense + self.groups.expert]

    def reduce(self) -> Tensor:
        # Dense shards partition each dense gradient over dp; expert shards partition each ep rank's
        # experts over edp, and ep ranks hold disjoint experts: one sum over dp covers everything once.
        grads = self._grads()
        counted = [g for p, g in zip(self.groups.dense + self.groups.expert, grads) if id(p) not in self.groups.copied]
        sq = squared_norm(counted, grads[0].device)
        dist.all_reduce(sq, group=self.pmesh.dp_group)
        return norm_over_stages(sq, self.pmesh)

    @torch.no_grad()
    def apply(self, lr: float, grad_clip: float, norm: Tensor) -> None:
        if grad_clip > 0:
            scale_(self._grads(), (grad_clip / (norm + 1e-6)).clamp(max=1.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
