"""Counting, on CPU, every operation that would make a CUDA stream wait for the host.

On a GPU, `torch.cuda.set_sync_debug_mode` finds these; on CPU nothing waits, so the test suite counts
them by kind instead: ops whose result the host must read (`.item()`, `int(t)`, `bool(t)`), ops whose
output size depends on the data (`nonzero`, boolean indexing, `repeat_interleave` without `output_size`,
`unique`, `bincount`, `masked_select`), device-to-host copies (`.cpu()`, `.tolist()`, `.numpy()`), and
host-to-device copies from Python data (`torch.tensor(list)`, a pageable copy). Ops are seen through a
TorchDispatchMode (forward and backward alike); the Python-level copies through patched methods. What
`.cpu()` returned, and whatever is computed from it, is host data: reading it is free.
"""
from __future__ import annotations

import contextlib
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READS_DATA = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.argwhere.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX_BY_MASK = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


@dataclass
class HostSyncs:
    """What was counted: one entry per sync, with the kind and the project source line that caused it."""

    events: list[tuple[str, str]] = field(default_factory=list)
    _on_host: dict[int, weakref.ref] = field(default_factory=dict)
    """Tensors that stand for host memory (by id; tensors compare by value): results of `.cpu()` and what is
    computed from them."""

    def mark_host(self, t: torch.Tensor) -> None:
        self._on_host[id(t)] = weakref.ref(t)

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._on_host.get(id(t))
        return ref is not None and ref() is t

    @property
    def count(self) -> int:
        return len(self.events)

    def record(self, kind: str) -> None:
        self.events.append((kind, _caller()))

    def __str__(self) -> str:
        return "\n".join(f"  {kind} at {where}" for kind, where in self.events) or "  none"


def _caller() -> str:
    """The innermost frame in moeyard's own code (not torch, not this helper)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and "host_syncs.py" not in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2:]}:{frame.lineno} {frame.line}"
    return "?"


def _is_sync(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in _READS_DATA:
        return str(func)
    if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in _INDEX_BY_MASK:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return f"{func} with a boolean mask"
    return None


class _CountOps(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        from_host = any(self.syncs.is_host(t) for t in inputs)
        kind = None if from_host else _is_sync(func, args, kwargs)
        if kind is not None:
            self.syncs.record(kind)
        out = func(*args, **kwargs)
        if from_host:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.syncs.mark_host(t)
        return out


@contextlib.contextmanager
def counting_host_syncs() -> Iterator[HostSyncs]:
    """Count inside the block (this thread; CPU autograd runs backward on it too)."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy")}
    tensor_fn = torch.tensor

    def copy_to_host(name: str):
        def method(self, *args, **kwargs):
            if not syncs.is_host(self):
                syncs.record(f"Tensor.{name}()")
            out = originals[name](self, *args, **kwargs)
            if name == "cpu":
                out = out.view_as(out)  # a tensor of its own to mark (on CPU, .cpu() returns self)
                syncs.mark_host(out)
            return out
        return method

    def from_python(data, *args, **kwargs):
        if isinstance(data, (list, tuple)):
            syncs.record("torch.tensor(python data): a pageable host-to-device copy")
        return tensor_fn(data, *args, **kwargs)

    try:
        for name in originals:
            setattr(torch.Tensor, name, copy_to_host(name))
        torch.tensor = from_python
        with _CountOps(syncs):
            yield syncs
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = tensor_fn
