"""Sharded AdamW (ZeRO-1/2): each rank keeps optimizer state for its shard of every bucket.

Works with `BucketedReducer(mode="reduce_scatter")`: after backward each rank
holds only its slice of each bucket's averaged gradient. It updates its slice of
the parameters (the same element-wise AdamW arithmetic as torch.optim.AdamW),
then the slices are all-gathered back so every rank has the full parameters.
Dense buckets are sharded over dp, expert buckets over edp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.parallel.grads.adamw import adamw_update
from moeyard.parallel.grads.buckets import Bucket, BucketedReducer, all_gather
from moeyard.parallel.grads.reduce import scale_, squared_norm


@dataclass
class _Segment:
    """The part of one parameter that falls into this rank's shard."""

    param_index: int
    lo: int
    """Start within the shard."""
    hi: int
    decay: bool


@dataclass
class _ShardState:
    bucket: Bucket
    lo: int
    """Start of this rank's shard within the bucket's flat layout."""
    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    segments: list[_Segment]


class ShardedAdamW:
    def __init__(self, reducer: BucketedReducer, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, no_decay: frozenset[int] | None = None,
                 moment_dtype: torch.dtype = torch.float32) -> None:
        """`no_decay`: ids of parameters without weight decay (default: the 1-D ones); `moment_dtype`: what
        the two moments are stored in (bfloat16: updated in float32 and rounded back, as
        parallel/grads/adamw.py)."""
        if reducer.mode != "reduce_scatter":
            raise ValueError("ShardedAdamW needs a BucketedReducer in reduce_scatter mode")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.shards = [self._init_shard(b, no_decay, moment_dtype) for b in reducer.buckets]

    @staticmethod
    def _init_shard(bucket: Bucket, no_decay: frozenset[int] | None, moment_dtype: torch.dtype) -> _ShardState:
        size = bucket.shard_size
        lo = dist.get_rank(bucket.group) * size
        flat = torch.cat([p.detach().reshape(-1) for p in bucket.params])
        param = flat.new_zeros(size)
        end = min(lo + size, flat.numel())
        if end > lo:
            param[:end - lo] = flat[lo:end]
        segments = []
        for i, (p, start, stop) in enumerate(zip(bucket.params, bucket.offsets, bucket.offsets[1:])):
            a, b = max(start, lo), min(stop, lo + size)
            if a < b:
                decay = p.dim() >= 2 if no_decay is None else id(p) not in no_decay
                segments.append(_Segment(i, a - lo, b - lo, decay=decay))
        moments = (torch.zeros_like(param, dtype=moment_dtype) for _ in range(2))
        return _ShardState(bucket, lo, param, *moments, segments)

    def grad_sq_sum(self) -> Tensor:
        """This rank's share of the squared global gradient norm; all-reduce over dp for the total."""
        return squared_norm([s.bucket.grad_shard for s in self.shards], self.shards[0].param.device)

    def scale_grads(self, coef: Tensor) -> None:
        scale_([s.bucket.grad_shard for s in self.shards], coef)

    def step(self) -> None:
        """One AdamW step on every shard, then gather the updated parameters into the model."""
        self.step_count += 1
        works = []
        for s in self.shards:
            grad = s.bucket.grad_shard
            if self.weight_decay:
                for seg in s.segments:
                    if seg.decay:
                        s.param[seg.lo:seg.hi].mul_(1 - self.lr * self.weight_decay)
            adamw_update(s.param, grad, s.exp_avg, s.exp_avg_sq, lr=self.lr, betas=self.betas, eps=self.eps,
                         step=self.step_count)
            # The reduce buffer doubles as the gather buffer, unless it holds a narrower reduce dtype.
            gathered = s.bucket.flat if s.bucket.flat.dtype == s.param.dtype else s.param.new_empty(
                s.bucket.flat.numel())
            works.append((gathered, all_gather(gathered, s.param, group=s.bucket.group, async_op=True)))
        for s, (gathered, work) in zip(self.shards, works):
            work.wait()
            with torch.no_grad():
                for p, start, stop in zip(s.bucket.params, s.bucket.offsets, s.bucket.offsets[1:]):
                    p.copy_(gathered[start:stop].view_as(p))
            s.bucket.grad_shard = None

    def full_states(self) -> dict[int, dict[str, Tensor]]:
        """Unsharded AdamW state per parameter (keyed by id), as torch.optim.AdamW holds it.

        Collective over each bucket's group; the checkpoint format then does not
        depend on how the state was sharded.
        """
        states: dict[int, dict[str, Tensor]] = {}
        for s in self.shards:
            full = {}
            for key in ("exp_avg", "exp_avg_sq"):
                gathered = getattr(s, key).new_empty(s.bucket.flat.numel())
                all_gather(gathered, getattr(s, key), group=s.bucket.group)
                full[key] = gathered
            for p, start, stop in zip(s.bucket.params, s.bucket.offsets, s.bucket.offsets[1:]):
                states[id(p)] = {"step": torch.tensor(float(self.step_count)),
                                 **{k: v[start:stop].view_as(p).clone() for k, v in full.items()}}
        return states

    def load_full_states(self, states: dict[int, dict[str, Tensor]]) -> None:
        """Take unsharded per-parameter AdamW state (keyed by id) into this rank's shards."""
        steps = set()
        for s in self.shards:
            for seg in s.segments:
                p = s.bucket.params[seg.param_index]
                start = s.bucket.offsets[seg.param_index]  # where p begins in the bucket's flat layout
                lo, hi = s.lo + seg.lo - start, s.lo + seg.hi - start  # the part of p in this shard
                state = states[id(p)]
                s.exp_avg[seg.lo:seg.hi] = state["exp_avg"].reshape(-1)[lo:hi]
                s.exp_avg_sq[seg.lo:seg.hi] = state["exp_avg_sq"].reshape(-1)[lo:hi]
                steps.add(int(state["step"]))
            # Master copy of the parameters: the model holds the loaded values.
            flat = torch.cat([q.detach().reshape(-1) for q in s.bucket.params])
            end = min(s.lo + s.param.numel(), flat.numel())
            s.param.zero_()
            if end > s.lo:
                s.param[:end - s.lo] = flat[s.lo:end]
        if len(steps) > 1:
            raise ValueError(f"optimizer state holds different step counts {sorted(steps)}")
        self.step_count = steps.pop() if steps else 0
