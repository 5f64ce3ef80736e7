"""The experts' MLP as one autograd node: a loop of GEMMs per expert, forward and backward written out.

Why not plain autograd over a Python loop: autograd would concatenate the expert
outputs (a copy of every row), stack the per-expert weight gradients (a copy of
every weight gradient) and keep five activations per expert. Here each GEMM
writes straight into its slice of one output buffer and one gradient buffer per
weight, and the backward is exactly the 6 GEMMs plus one fused activation
backward a hand-written loop would run (biases and GPT-OSS's clamped SwiGLU
included). `recompute="full"` keeps only the input rows and recomputes the two
up-projections in backward: activation checkpointing for the expert MLPs (2
extra GEMMs of 9, most of the layer's activation memory saved); "selective"
keeps the two up-projections and recomputes the activation and the product
(half the activations, no GEMM again).

Inside `deferring_weight_gradients(queue)` (models/weight_steps.py: the input step
of a zero-bubble pipeline schedule) the backward computes the input
gradient only and queues the weight-gradient GEMMs (3 of the 6 a backward
runs), which add to the weights' `.grad` when the queue is run: the schedule's
weight step, which fills its bubble. It holds each expert's rows, output
gradient and the two hidden gradients until then.

Shape legend: see models/__init__.py; here as in expert_mlp.py.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import moeyard.models.weight_steps as weight_steps
from moeyard.models.float8 import float8_mm
from moeyard.models.moe.expert_mlp import ExpertActivation

WEIGHTS = 7
"""_ExpertLoop.apply's first weight argument: its inputs before are x, the row counts and five settings."""


def _rows(t: Tensor, order: Optional[Tensor], start: int, n: int) -> Tensor:
    """An expert's rows: a slice of expert-grouped rows, or gathered through `order`."""
    return t.narrow(0, start, n) if order is None else t.index_select(0, order.narrow(0, start, n))


def _put_rows(out: Tensor, order: Tensor, start: int, rows: Tensor) -> None:
    """Write an expert's output rows back to their positions in `order`."""
    out.index_copy_(0, order.narrow(0, start, rows.shape[0]), rows)


def _weight_step(params: tuple[nn.Parameter, ...], needs: tuple[bool, ...], dtype: torch.dtype,
                 stash: list[tuple[Tensor, ...]]) -> Callable[[], None]:
    """The weight gradients of one loop's backward, from each expert's (x, h, dy, dh1, dh2), in the `dtype` the
    loop computed in (not holding the weights it computed with: under autocast, copies), added to the
    parameters' .grad in theirs."""
    def run() -> None:
        with torch.no_grad():
            grads = [torch.empty(p.shape, dtype=dtype, device=p.device) for p in params]
            for e, (x_nD, h_nF, dy_nD, dh1_nF, dh2_nF) in enumerate(stash):
                _weight_gemms(grads, e, len(params) > 3, x_nD, h_nF, dy_nD, dh1_nF, dh2_nF)
            stash.clear()
            for p, g, need in zip(params, grads, needs):
                if need:
                    weight_steps.add_grad(p, g)
    return run


def _weight_gemms(grads: list[Optional[Tensor]], e: int, biased: bool, x_nD: Tensor, h_nF: Tensor, dy_nD: Tensor,
                  dh1_nF: Tensor, dh2_nF: Tensor) -> None:
    """Expert e's weight (and bias) gradients into its slices of `grads` (gate, up, down, then the biases)."""
    torch.mm(h_nF.t(), dy_nD, out=grads[2][e])
    torch.mm(x_nD.t(), dh1_nF, out=grads[0][e])
    torch.mm(x_nD.t(), dh2_nF, out=grads[1][e])
    if biased:
        torch.sum(dh1_nF, 0, out=grads[3][e])
        torch.sum(dh2_nF, 0, out=grads[4][e])
        torch.sum(dy_nD, 0, out=grads[5][e])


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD: Tensor, rows_per_expert: list[int], recompute: str, order: Optional[Tensor],
                activation: ExpertActivation, params: Optional[Sequence[nn.Parameter]], fp8: bool,
                *weights: Tensor) -> Tensor:
        w_gate_EDF, w_up_EDF, w_down_EFD, *biases = weights
        mm = functools.partial(float8_mm, weight=True) if fp8 else torch.mm
        swiglu = activation.kind == "swiglu"
        y_SD = x_SD.new_empty(x_SD.shape[0], w_down_EFD.shape[-1])
        saved: list[Tensor] = []  # h1, h2 (unless full), SiLU(h1) (swiglu only) and h (unless selective)
        start = 0
        for e, n in enumerate(rows_per_expert):
            x_nD = _rows(x_SD, order, start, n)
            h1_nF, h2_nF = mm(x_nD, w_gate_EDF[e]), mm(x_nD, w_up_EDF[e])
            if biases:
                h1_nF += biases[0][e]
                h2_nF += biases[1][e]
            act_nF = F.silu(h1_nF) if swiglu else None
            h_nF = act_nF * h2_nF if swiglu else activation(h1_nF, h2_nF)
            if order is None and not fp8:
                y_nD = y_SD.narrow(0, start, n)
                if biases:
                    torch.addmm(biases[2][e], h_nF, w_down_EFD[e], out=y_nD)
                else:
                    torch.mm(h_nF, w_down_EFD[e], out=y_nD)
            elif order is None:
                y_nD = y_SD.narrow(0, start, n).copy_(mm(h_nF, w_down_EFD[e]))
                if biases:
                    y_nD += biases[2][e]
            else:
                y_nD = mm(h_nF, w_down_EFD[e])
                _put_rows(y_SD, order, start, y_nD + biases[2][e] if biases else y_nD)
            if recompute == "none":
                saved += [h1_nF, h2_nF, act_nF, h_nF] if swiglu else [h1_nF, h2_nF, h_nF]
            elif recompute == "selective":
                saved += [h1_nF, h2_nF]
            start += n
        ctx.rows_per_expert, ctx.activation, ctx.weights, ctx.fp8 = rows_per_expert, activation, len(weights), fp8
        # The model's parameters (not saved tensors: nothing held), for a deferred weight step's .grad: those
        # the weights were cast from, or the weights themselves; None for copies (an executor's).
        params = tuple(params) if params is not None else weights
        ctx.params = params if all(isinstance(p, nn.Parameter) for p in params) else None
        ctx.kept = {"none": 4 if swiglu else 3, "selective": 2, "full": 0}[recompute]
        # Through save_for_backward, not a ctx attribute: autograd frees them after backward.
        ctx.save_for_backward(x_SD, order, *weights, *saved)
        return y_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_SD: Tensor):
        x_SD, order, *rest = ctx.saved_tensors
        weights, saved = rest[:ctx.weights], rest[ctx.weights:]
        w_gate_EDF, w_up_EDF, w_down_EFD, *biases = weights
        activation, swiglu = ctx.activation, ctx.activation.kind == "swiglu"
        # with weights as second operands only: the weight gradients stay in the compute dtype
        mm = functools.partial(float8_mm, weight=True) if ctx.fp8 else torch.mm
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[WEIGHTS:])
        stash: Optional[list[tuple[Tensor, ...]]] = [] if need_w and weight_steps.deferring() and ctx.params else None
        grad_x_SD = torch.empty_like(x_SD) if need_x else None
        grads = [torch.empty_like(w) if need_w and stash is None else None for w in weights]
        grad_y_SD = grad_y_SD.contiguous()
        start = 0
        for e, n in enumerate(ctx.rows_per_expert):
            x_nD, dy_nD = _rows(x_SD, order, start, n), _rows(grad_y_SD, order, start, n)
            kept = saved[ctx.kept * e:ctx.kept * (e + 1)]
            if kept:
                h1_nF, h2_nF = kept[:2]
            else:
                h1_nF, h2_nF = mm(x_nD, w_gate_EDF[e]), mm(x_nD, w_up_EDF[e])
                if biases:
                    h1_nF += biases[0][e]
                    h2_nF += biases[1][e]
            dh_nF = mm(dy_nD, w_down_EFD[e].t())
            if swiglu:
                act_nF, h_nF = kept[2:] if ctx.kept == 4 else (F.silu(h1_nF), None)
                h_nF = act_nF * h2_nF if h_nF is None else h_nF
                dh1_nF, dh2_nF = torch.ops.aten.silu_backward(dh_nF * h2_nF, h1_nF), dh_nF * act_nF
            else:
                h_nF = kept[2] if ctx.kept == 3 else activation(h1_nF, h2_nF)
                dh1_nF, dh2_nF = activation.backward(h1_nF, h2_nF, dh_nF)
            if stash is not None:
                stash.append((x_nD, h_nF, dy_nD, dh1_nF, dh2_nF))
            elif need_w:
                _weight_gemms(grads, e, bool(biases), x_nD, h_nF, dy_nD, dh1_nF, dh2_nF)
            if need_x:
                dx_nD = grad_x_SD.narrow(0, start, n) if order is None else x_nD.new_empty(n, x_nD.shape[1])
                if ctx.fp8:
                    dx_nD.copy_(mm(dh1_nF, w_gate_EDF[e].t())).add_(mm(dh2_nF, w_up_EDF[e].t()))
                else:
                    torch.mm(dh1_nF, w_gate_EDF[e].t(), out=dx_nD)
                    dx_nD.addmm_(dh2_nF, w_up_EDF[e].t())
                if order is not None:
                    _put_rows(grad_x_SD, order, start, dx_nD)
            start += n
        needs = ctx.needs_input_grad
        if stash is not None:
            weight_steps.defer(_weight_step(ctx.params, needs[WEIGHTS:], w_gate_EDF.dtype, stash))
        return (grad_x_SD, *(None,) * (WEIGHTS - 1), *(g if n else None for g, n in zip(grads, needs[WEIGHTS:])))


def expert_mlp_fused_loop(x_SD: Tensor, rows_per_expert: list[int], weights: tuple[Tensor, ...],
                          activation: ExpertActivation = ExpertActivation(), recompute: str = "none",
                          order: Optional[Tensor] = None, params: Optional[Sequence[nn.Parameter]] = None,
                          fp8: bool = False) -> Tensor:
    """CPU fast path: the experts' MLP (expert_mlp.py; `weights` gate, up, down, then optionally the three
    biases) over each expert's rows, as one autograd node.

    Rows are grouped by expert, or, with `order`, expert e's rows are x[order[a:b]] for its span [a, b)
    of `rows_per_expert`, and its outputs land in the same positions: received rows (grouped by source
    rank) are regrouped inside the loop, one expert at a time while they are in cache, instead of
    by two whole-tensor gathers and their scatters in backward. `params`: the model's parameters `weights`
    were cast from (under autocast), whose .grad a deferred weight step adds to. `fp8` (train.fp8): the
    forward and input-gradient GEMMs in float8 with row-wise scales (models/float8.py), the weight gradients
    in the compute dtype."""
    graph = torch.is_grad_enabled() and (x_SD.requires_grad or any(w.requires_grad for w in weights))
    # Without a graph nothing is kept: evaluation holds one expert's activations at a time.
    return _ExpertLoop.apply(x_SD, list(rows_per_expert), recompute if graph else "full", order, activation,
                             params, fp8, *weights)
