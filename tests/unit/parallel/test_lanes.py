"""overlapped_1f1b's lanes (parallel/lanes.py): which group a collective takes in each lane, where the
backward lane's autograd runs, and the trace arithmetic the distributed test reads."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moeyard.parallel import lanes


def test_the_backward_lane_takes_the_twins_and_keeps_autograd_in_its_thread() -> None:
    group, twin, lone = object(), object(), object()
    lanes._twins[group] = twin
    try:
        def seen() -> tuple:
            return lanes.lane_group(group), torch.autograd.is_multithreading_enabled()

        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lanes.in_backward_lane, seen).result() == (twin, False)
            assert pool.submit(seen).result() == (group, True)  # the mark and the setting end with the call
        assert lanes.lane_group(group) is group
        with pytest.raises(AssertionError, match="without a twin"):
            lanes.in_backward_lane(lanes.lane_group, lone)
    finally:
        del lanes._twins[group]


def test_hidden_seconds_count_only_the_other_lanes_computing() -> None:
    """A forward all-to-all [1, 5] while the backward lane's micro-batch runs [0, 10] with its own
    all-to-all [2, 3]: hidden for 3 s (1-2 and 3-5); the backward's all-to-all [2, 3] lies inside the
    forward's all-to-all, with the forward lane computing around it [0, 1] and [5, 6], so 0 s."""
    trace = lanes.Trace([("forward", "micro-batch", 0.0, 6.0), ("forward", "a2a", 1.0, 5.0),
                         ("backward", "micro-batch", 0.0, 10.0), ("backward", "a2a", 2.0, 3.0)])
    assert trace.hidden_seconds("forward") == pytest.approx(3.0)
    assert trace.hidden_seconds("backward") == 0.0
    assert trace.a2a_seconds("forward") == 4.0 and trace.a2a_seconds("backward") == 1.0
