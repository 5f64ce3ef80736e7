"""Host batches bound for a GPU are pinned before the non-blocking copy (faked on CPU: no GPU here)."""
from __future__ import annotations

import torch

from moeyard.models.device_copy import to_device


def test_a_host_tensor_bound_for_a_gpu_is_pinned_then_queued(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, **kw: calls.append(("to", str(device), kw)) or self)
    to_device(torch.zeros(2, 3, dtype=torch.int64), "cuda")
    assert calls == ["pin", ("to", "cuda", {"non_blocking": True})]
    calls.clear()
    to_device(torch.zeros(2), torch.device("cpu"))
    assert calls == [("to", "cpu", {"non_blocking": True})], "nothing to pin for a host destination"
