"""Weight gradients a zero-bubble pipeline schedule runs after the input step of a backward.

interleaved_zero_bubble, zbv_zero_bubble and dualpipev split each backward into an input step (the gradient
the previous stage waits for) and a weight step (the parameters' gradients, which nothing downstream waits
for: the schedule runs it where a stage would otherwise idle). moeyard's stages run the whole backward in
the input step (parallel/pipeline.py says why); inside `deferring_weight_gradients(queue)` the GEMMs that
compute weight gradients are queued as closures instead, and the weight step runs them, adding to each
parameter's `.grad`. Three places queue: the expert loop (models/moe/expert_loop.py), the grouped GEMM's
`grouped_mm` and every `Linear` of the blocks (attention, dense and shared FFNs, MTP projections), each
holding its input rows and output gradient until its weight step.

The forward must already take these functions for their backward to queue: a schedule that defers arms
them for its step (`splitting_backward`); outside one, `Linear` is nn.Linear and `grouped_mm` torch's own.

Shape legend: see models/__init__.py (N rows, A rows of a padded grouped-GEMM buffer, E experts, I and O a
weight's input and output dims).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from moeyard.models.float8 import float8_grouped_mm, float8_mm

_queue: Optional[list[Callable[[], None]]] = None
"""Where backward queues weight steps (deferring_weight_gradients). Process-wide, not per thread: autograd runs
a GPU's backward on its own device thread while the caller waits."""
_armed = False
"""Whether forwards take the deferring functions (splitting_backward)."""


@contextmanager
def splitting_backward(armed: bool = True) -> Iterator[None]:
    """Within: `Linear` and `grouped_mm` build graphs whose backward can queue its weight GEMMs (a split-backward
    schedule's step, forwards and recomputed forwards included)."""
    global _armed
    previous, _armed = _armed, armed
    try:
        yield
    finally:
        _armed = previous


def armed() -> bool:
    return _armed


@contextmanager
def deferring_weight_gradients(queue: list[Callable[[], None]]) -> Iterator[None]:
    """Within (one backward at a time): weight-gradient GEMMs are appended to `queue` as closures instead of
    run, wherever the model's own parameters are known (not copies an executor made)."""
    global _queue
    previous, _queue = _queue, queue
    try:
        yield
    finally:
        _queue = previous


def defer(work: Callable[[], None]) -> bool:
    """Queue `work` for the weight step being collected; False (not queued) outside deferring_weight_gradients."""
    if _queue is None:
        return False
    _queue.append(work)
    return True


def deferring() -> bool:
    """Whether a backward running now queues its weight gradients."""
    return _queue is not None


def add_grad(param: nn.Parameter, grad: Tensor) -> None:
    """Accumulate `grad` into `param.grad` in the parameter's dtype, as autograd would have."""
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad.add_(grad)


class _Matmul(torch.autograd.Function):
    """x @ weight (weight [I, O]; `transposed`: [O, I], as nn.Linear's) or, with `offs`,
    torch._grouped_mm(x, weight [E, I, O], offs): the weight cast to x's dtype inside, so that a deferred
    weight gradient can be added to the parameter itself. The parameter is saved, not its cast: a cast per
    micro-batch in flight would be held until its backward (autocast's cache shares one), so backward casts
    again. `fp8`: the forward and input-gradient GEMMs in float8 with row-wise scales (models/float8.py), and
    without `offs` the weight gradient's too."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: nn.Parameter, transposed: bool, offs: Optional[Tensor],
                fp8: bool = False) -> Tensor:
        ctx.transposed, ctx.param, ctx.fp8 = transposed, weight, fp8
        # FP8 layers take this function unarmed too (their backward then runs whole), and FP8 experts with
        # weights an executor copied (no parameter to add a deferred gradient to)
        ctx.armed = _armed and isinstance(weight, nn.Parameter)
        ctx.save_for_backward(x, weight, offs)
        w = weight.to(x.dtype)
        w = w.t() if transposed else w
        if offs is not None:
            return float8_grouped_mm(x, w, offs) if fp8 else torch._grouped_mm(x, w, offs=offs)
        if fp8:
            return float8_mm(x.reshape(-1, x.shape[-1]), w, weight=True).view(*x.shape[:-1], w.shape[-1])
        return x @ w

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, offs = ctx.saved_tensors
        w = weight.to(dy.dtype)
        w = w.t() if ctx.transposed else w
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        transposed, param, fp8 = ctx.transposed, ctx.param, ctx.fp8
        mm = float8_mm if fp8 else torch.mm
        dx = None
        if need_x and offs is None:
            dy_NO = dy.reshape(-1, dy.shape[-1])
            dx = (float8_mm(dy_NO, w.t(), weight=True) if fp8 else dy_NO @ w.t()).view(*dy.shape[:-1], w.shape[0])
        elif need_x and fp8:
            dx = float8_grouped_mm(dy, w.transpose(-2, -1), offs)
        elif need_x:
            dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs)
        if not need_w:
            return dx, None, None, None, None

        def weight_grad() -> Tensor:
            if offs is not None:  # in the compute dtype also with fp8 (models/float8.py says why)
                return torch._grouped_mm(x.t(), dy, offs=offs)
            x_NI, dy_NO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            return mm(dy_NO.t(), x_NI) if transposed else mm(x_NI.t(), dy_NO)  # as the weight is laid out

        @torch.no_grad()  # run later, outside backward: x requires grad, and would tie a graph to the gradient
        def weight_step() -> None:
            grad = param.grad
            if offs is None and not fp8 and grad is not None and grad.dtype == dy.dtype and grad.is_contiguous():
                # straight into the gradient: no weight-sized temporary each micro-batch
                x_NI, dy_NO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
                grad.addmm_(dy_NO.t(), x_NI) if transposed else grad.addmm_(x_NI.t(), dy_NO)
            else:
                add_grad(param, weight_grad())

        if ctx.armed and defer(weight_step):
            return dx, None, None, None, None
        return dx, weight_grad().to(param.dtype), None, None, None


def grouped_mm(x_AI: Tensor, w_EIO: Tensor, offs_E: Tensor, fp8: bool = False) -> Tensor:
    """torch._grouped_mm(x_AI, w_EIO, offs=offs_E) whose weight gradient a split backward may defer (armed and
    `w_EIO` a parameter); the weight is cast to x_AI's dtype. `fp8`: forward and input gradient in float8
    (models/float8.py), the weight gradient in x_AI's dtype."""
    if fp8 or (_armed and isinstance(w_EIO, nn.Parameter) and torch.is_grad_enabled()):
        return _Matmul.apply(x_AI, w_EIO, False, offs_E, fp8)
    return torch._grouped_mm(x_AI, w_EIO.to(x_AI.dtype), offs=offs_E)


class Linear(nn.Linear):
    """nn.Linear whose weight gradient a split backward may defer (splitting_backward), and whose GEMMs may
    run in FP8 (`fp8`, models/float8.py): the same parameters, state-dict keys and, outside a splitting
    schedule and without FP8, the same call."""

    fp8 = False
    """Forward and both backward GEMMs in float8 e4m3 with row-wise scales (Transformer.set_fp8)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.fp8 or (_armed and torch.is_grad_enabled() and self.weight.requires_grad)):
            return super().forward(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as F.linear under autocast: both operands in its dtype
            x = x.to(torch.get_autocast_dtype(device))
        y = _Matmul.apply(x, self.weight, True, None, self.fp8)
        return y if self.bias is None else y + self.bias.to(y.dtype)


__all__ = ["Linear", "armed", "defer", "deferring", "deferring_weight_gradients", "grouped_mm", "splitting_backward"]
