"""Host tensors onto the device without the host waiting for it.

`t.to("cuda", non_blocking=True)` from pageable memory is synchronous: the copy is staged through a driver
buffer and the host waits until the stream reaches it, which ends the host's run-ahead of the GPU once per
micro-batch. From page-locked (pinned) memory the copy is queued and the host goes on.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`; a host tensor bound for a GPU is pinned first (one host-side copy of a small
    tensor), so that the transfer is queued, not waited for."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
