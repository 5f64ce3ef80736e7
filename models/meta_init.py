"""Build a model without memory, and replay its initialisation one parameter at a time.

`build_model(cfg)` draws its initial values from the default generator in a fixed order (the layers'
own constructors, then `init_weights`, then the adapters). Built on the meta device it allocates
nothing and draws nothing; `build_on_meta` records what it would have drawn. `InitRecord.replay`
then runs the same draws on the CPU generator, in the same order, one whole parameter at a time, and
hands each parameter's final values to a callback that keeps only what its rank owns. So a rank
never holds more than its shards plus the largest single parameter, and every layout starts from
the values a plain `build_model(cfg)` under the same seed has.

Replaying is O(all parameters) in time on every rank (each draw must be made to advance the
generator); it is memory, not time, that this bounds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moeyard.models.build import build_model
from moeyard.models.config import ModelConfig
from moeyard.models.transformer import Transformer

aten = torch.ops.aten
_DRAWS = {aten.normal_.default, aten.uniform_.default}
"""In-place ops that draw from the generator and overwrite their target."""
_FILLS = {aten.zero_.default, aten.fill_.Scalar}
"""In-place ops that overwrite their target without drawing."""


@dataclass(frozen=True)
class InitOp:
    func: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    args: tuple
    kwargs: dict
    target: str | None
    """The parameter it wrote (its name in the model as built), or None (a temporary)."""


@dataclass
class InitRecord:
    ops: list[InitOp] = field(default_factory=list)

    def replay(self, keep: Callable[[str, Tensor], None]) -> None:
        """Make every recorded draw again on the CPU generator; call keep(name, values) with each
        parameter's values at its last write (a CPU tensor of its full shape, freed after the call)."""
        last = {op.target: i for i, op in enumerate(self.ops) if op.target is not None}
        for i, op in enumerate(self.ops):
            if op.func in _FILLS and last.get(op.target) != i:
                continue  # overwritten later and draws nothing: skip
            values = torch.empty(op.shape, dtype=op.dtype)
            op.func(values, *op.args, **op.kwargs)
            if op.target is not None and last[op.target] == i:
                keep(op.target, values)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, Tensor, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DRAWS or func in _FILLS:
            self.calls.append((func, args[0], tuple(args[1:]), dict(kwargs)))
        elif func._schema.is_mutable and args and isinstance(args[0], torch.nn.Parameter):
            raise NotImplementedError(f"{func} changes a parameter during construction, and meta-device "
                                      f"initialisation replays only whole-tensor draws and fills; add it to "
                                      f"moeyard.models.meta_init")
        return func(*args, **kwargs)


def build_on_meta(cfg: ModelConfig) -> tuple[Transformer, InitRecord]:
    """The model with every parameter and buffer on the meta device, and the record of its initialisation.
    Buffers are set with `model.reset_buffers()` once the model is on a real device."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = build_model(cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        names.setdefault(id(buffer), None)
    record = InitRecord([InitOp(func, tuple(t.shape), t.dtype, args, kwargs, names.get(id(t)))
                         for func, t, args, kwargs in recorder.calls])
    return model, record


_INIT_METHODS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}


class _SkipInit(TorchFunctionMode):
    """Drops initialisation (torch.nn.init's functions, and draws and fills called on tensors). On the meta
    device it changes nothing, and torch's meta kernel for a draw imports torch._dynamo, and FSDP and DTensor
    with it: a second and a half of every launch. (A function mode: entering a dispatch mode imports
    torch._dynamo too.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT_METHODS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def shapes_only(cfg: ModelConfig) -> Transformer:
    """The model on the meta device, its initialisation skipped: its parameters' names and shapes, for the
    planning and checks that run before any worker (the launcher)."""
    with torch.device("meta"), _SkipInit():
        return build_model(cfg)
