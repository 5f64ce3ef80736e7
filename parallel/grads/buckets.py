"""Bucketed, asynchronous gradient reduction launched from backward hooks.

Parameters are laid out in backward order (the reverse of registration order)
and cut into buckets whose sizes come from the plan; dense parameters and expert
parameters form separate bucket lists, reduced over dp and over edp. When the
last gradient of a bucket has been accumulated, the bucket is copied into its
flat buffer and its collective launched (`async_op=True`), so it travels while
backward continues. `finish()` waits for everything before the optimizer step.

Collectives must be issued in the same order on every rank, so buckets of a
list launch strictly in order: a bucket that is ready early waits for the ones
before it. A gradient that never arrives on this rank (an expert shard that
received no rows) is taken as zeros at `finish()`, in order.

Modes:
  all_reduce      every rank ends with the full averaged gradient (p.grad).
  reduce_scatter  every rank ends with only its shard of each bucket's averaged
                  gradient (`Bucket.grad_shard`), for a sharded optimizer (zero.py).
Scaling follows reduce.py: sum over the group, divide by dp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moeyard.parallel.grads.reduce import ParamGroups
from moeyard.parallel.mesh import ParallelMesh

SyncMode = Literal["all_reduce", "reduce_scatter"]

# torch 2.13 renamed the flat-tensor collectives; keep working on older releases.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup
    flat: Tensor
    """Gradients of all params, back to back, padded to a multiple of the group size, in the reduce dtype."""
    offsets: list[int]
    ready: int = 0
    work: Optional[dist.Work] = None
    grad_shard: Optional[Tensor] = None
    """reduce_scatter mode: this rank's slice of the averaged flat gradient."""

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def shard_size(self) -> int:
        return self.flat.numel() // dist.get_world_size(self.group)


def split_into_buckets(params: list[nn.Parameter], sizes: tuple[int, ...]) -> list[list[nn.Parameter]]:
    """Cut `params` (already in backward order) into consecutive buckets of `sizes` parameters."""
    if sum(sizes) != len(params) or any(s < 1 for s in sizes):
        raise ValueError(f"bucket sizes {sizes} do not partition {len(params)} parameters")
    out, start = [], 0
    for size in sizes:
        out.append(params[start:start + size])
        start += size
    return out


def bucket_sizes(nbytes: list[float], cap_bytes: float) -> tuple[int, ...]:
    """Bucket sizes (items per bucket), closing a bucket once it holds at least `cap_bytes`."""
    sizes, count, total = [], 0, 0.0
    for n in nbytes:
        count += 1
        total += n
        if total >= cap_bytes:
            sizes.append(count)
            count, total = 0, 0.0
    if count:
        sizes.append(count)
    return tuple(sizes)


def backward_order(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Gradients arrive roughly in reverse registration order."""
    return list(reversed(params))


def _make_bucket(params: list[nn.Parameter], group: dist.ProcessGroup, dtype: torch.dtype) -> Bucket:
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    world = dist.get_world_size(group)
    padded = -(-offsets[-1] // world) * world
    return Bucket(params=params, group=group, flat=params[0].new_zeros(padded, dtype=dtype), offsets=offsets)


class BucketedReducer:
    """Owns the hooks; one per training run."""

    def __init__(self, groups: ParamGroups, pmesh: ParallelMesh, dense_sizes: tuple[int, ...],
                 expert_sizes: tuple[int, ...], mode: SyncMode = "all_reduce",
                 reduce_dtype: torch.dtype = torch.float32) -> None:
        """`reduce_dtype` (parallel.reduce_dtype): what the collectives carry; bfloat16 halves their bytes,
        results come back into the float32 gradients."""
        self.mode = mode
        self.scale = 1.0 / pmesh.dp
        self.lists: list[list[Bucket]] = []
        for params, sizes, group in ((groups.dense, dense_sizes, pmesh.dp_group),
                                     (groups.expert, expert_sizes, pmesh.edp_group)):
            if params:
                self.lists.append([_make_bucket(b, group, reduce_dtype)
                                   for b in split_into_buckets(backward_order(params), sizes)])
        self._where: dict[int, tuple[int, int]] = {}
        for li, buckets in enumerate(self.lists):
            for bi, bucket in enumerate(buckets):
                for p in bucket.params:
                    self._where[id(p)] = (li, bi)
        self._next = [0] * len(self.lists)
        self.sync = True
        """False on non-final micro-steps: gradients only accumulate locally."""
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in groups.dense + groups.expert
        ]

    @property
    def buckets(self) -> list[Bucket]:
        return [b for buckets in self.lists for b in buckets]

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self.sync:
            return
        li, bi = self._where[id(param)]
        self.lists[li][bi].ready += 1
        self._launch_ready(li)

    def _launch_ready(self, li: int, force: bool = False) -> None:
        buckets = self.lists[li]
        while self._next[li] < len(buckets):
            bucket = buckets[self._next[li]]
            if not force and bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next[li] += 1

    def _launch(self, bucket: Bucket) -> None:
        for p, start, end in zip(bucket.params, bucket.offsets, bucket.offsets[1:]):
            view = bucket.flat[start:end]
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1))
        if self.mode == "all_reduce":
            bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)
        else:
            bucket.grad_shard = bucket.flat.new_empty(bucket.shard_size)
            bucket.work = reduce_scatter(bucket.grad_shard, bucket.flat, group=bucket.group, async_op=True)

    def finish(self) -> None:
        """Launch whatever did not fill, wait for all, and leave averaged gradients in place."""
        for li in range(len(self.lists)):
            self._launch_ready(li, force=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            bucket.ready = 0
            if self.mode == "all_reduce":
                flat = bucket.flat.to(bucket.params[0].dtype).mul_(self.scale)  # scaled in the parameters' dtype
                for p, start, end in zip(bucket.params, bucket.offsets, bucket.offsets[1:]):
                    grad = flat[start:end].view_as(p)
                    if p.grad is None:
                        p.grad = grad.clone()
                    else:
                        p.grad.copy_(grad)
            else:
                bucket.grad_shard = bucket.grad_shard.to(bucket.params[0].dtype).mul_(self.scale)
                for p in bucket.params:
                    p.grad = None  # the sharded optimizer reads grad_shard; full gradients are not kept
        self._next = [0] * len(self.lists)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
