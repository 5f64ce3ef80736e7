"""Two lanes of work on one rank: one micro-batch's forward and another's backward side by side
(schedule.pipeline=overlapped_1f1b), so that one lane's all-to-alls travel while the other computes.

The backward lane is a second thread. Collectives must reach every rank of a group in the same order, and
two threads issuing on one group would interleave differently on each rank; so every group a lane's
collectives use has a twin, made with the same ranks (`make_twins`, collectively, by build_mesh): a
collective issued from the backward lane goes on the twin (`lane_group`). Each group then sees one lane's
collectives only, in that lane's order, the same on every rank of the stage (they run the same schedule).

`trace()` records when each lane's collectives and micro-batches ran, so a test can see which collective
overlapped which computation (on CPU, where nothing else shows it).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

_state = threading.local()
_twins: dict[dist.ProcessGroup, dist.ProcessGroup] = {}
T = TypeVar("T")


def make_twins(groups: list[tuple[list[int], Optional[dist.ProcessGroup]]], timeout: timedelta) -> None:
    """For each (ranks, this rank's group or None where it is not a member), in the same order on every rank
    (new_group is collective over the world): a group of the same ranks for the backward lane."""
    for ranks, mine in groups:
        twin = dist.new_group(ranks, timeout=timeout)
        if mine is not None:
            _twins[mine] = twin


def lane_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group a collective on `group` takes from this thread: its twin in the backward lane."""
    if getattr(_state, "backward_lane", False):
        twin = _twins.get(group)
        assert twin is not None, "a collective in the backward lane on a group without a twin (build_mesh lanes)"
        return twin
    return group


def in_backward_lane(fn: Callable[..., T], *args) -> T:
    """fn(*args) with this thread marked as the backward lane. Autograd's device threads are kept out (on a
    GPU, backward would otherwise run its nodes there, where this thread's mark is not seen and collectives
    would take the forward lane's groups): the backward runs in this thread, on every device."""
    _state.backward_lane = True
    try:
        with torch.autograd.set_multithreading_enabled(False):
            return fn(*args)
    finally:
        _state.backward_lane = False


@dataclass
class Trace:
    """(lane, kind, start, end) of each recorded interval: kind "a2a" (a collective of the expert exchange) or
    "micro-batch" (a lane's whole forward or backward of one micro-batch); seconds of a monotonic clock."""

    events: list[tuple[str, str, float, float]] = field(default_factory=list)

    def _spans(self, lane: str, kind: str) -> list[tuple[float, float]]:
        return sorted((s, e) for ln, k, s, e in self.events if ln == lane and k == kind)

    def a2a_seconds(self, lane: str) -> float:
        return sum(e - s for s, e in self._spans(lane, "a2a"))

    def hidden_seconds(self, lane: str) -> float:
        """Seconds of `lane`'s all-to-alls during which the other lane was computing: inside one of its
        micro-batches and not in one of its own all-to-alls."""
        other = "forward" if lane == "backward" else "backward"
        computing = _minus(self._spans(other, "micro-batch"), self._spans(other, "a2a"))
        return sum(max(0.0, min(e, ce) - max(s, cs)) for s, e in self._spans(lane, "a2a") for cs, ce in computing)


def _minus(spans: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of `spans` outside every hole."""
    out = []
    for start, end in spans:
        cursor = start
        for hs, he in holes:
            if he <= cursor or hs >= end:
                continue
            if hs > cursor:
                out.append((cursor, hs))
            cursor = max(cursor, he)
        if cursor < end:
            out.append((cursor, end))
    return out


_trace: Optional[Trace] = None


@contextmanager
def trace() -> Iterator[Trace]:
    """Record the lanes' collectives and micro-batches inside the block."""
    global _trace
    _trace = Trace()
    try:
        yield _trace
    finally:
        _trace = None


@contextmanager
def traced(kind: str) -> Iterator[None]:
    """Record the block as a `kind` interval of this thread's lane, while tracing."""
    if _trace is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        lane = "backward" if getattr(_state, "backward_lane", False) else "forward"
        _trace.events.append((lane, kind, start, time.monotonic()))
