"""Rank 0 decides, every rank learns: for file-system work that one rank should do alone.

A failure on rank 0 is raised on every rank, so no rank is left waiting in a
collective for a peer that has already died.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def from_rank0(action: Callable[[], T], error: type[Exception], what: str, passthrough: bool = False) -> T:
    """Run `action` on rank 0 only and return its result on every rank (it must pickle). If it raises,
    every rank raises `error` saying `what` failed on rank 0 and why; with `passthrough`, an exception that
    is already an `error` keeps its own message (a verdict meant for the user). Collective over the default
    group."""
    box: list = [None, None]  # result, message
    if dist.get_rank() == 0:
        try:
            box[0] = action()
        except Exception as err:  # noqa: BLE001 -- raised on every rank below
            mine = passthrough and isinstance(err, error)
            box[1] = str(err) if mine else f"{what} on rank 0 failed: {type(err).__name__}: {err}"
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise error(box[1])
    return box[0]
