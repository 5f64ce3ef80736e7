"""The experts' SwiGLU as one autograd node: a loop of GEMMs per expert, forward and backward written out.

Why not plain autograd over a Python loop: autograd would concatenate the expert
outputs (a copy of every row), stack the per-expert weight gradients (a copy of
every weight gradient) and keep five activations per expert. Here each GEMM
writes straight into its slice of one output buffer and one gradient buffer per
weight, and the backward is exactly the 6 GEMMs plus one fused SiLU backward a
hand-written loop would run. `recompute="full"` keeps only the input rows and
recomputes the two up-projections in backward: activation checkpointing for the
expert MLPs (2 extra GEMMs of 9, most of the layer's activation memory saved);
"selective" keeps the two up-projections and recomputes SiLU and the product
(half the activations, no GEMM again).

Shape legend: S rows grouped by expert, D model dim, F expert hidden dim, E local experts,
n rows of one expert.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _rows(t: Tensor, order: Optional[Tensor], start: int, n: int) -> Tensor:
    """An expert's rows: a slice of expert-grouped rows, or gathered through `order`."""
    return t.narrow(0, start, n) if order is None else t.index_select(0, order.narrow(0, start, n))


def _put_rows(out: Tensor, order: Tensor, start: int, rows: Tensor) -> None:
    """Write an expert's output rows back to their positions in `order`."""
    out.index_copy_(0, order.narrow(0, start, rows.shape[0]), rows)


class _SwiGLULoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD: Tensor, rows_per_expert: list[int], recompute: str, order: Optional[Tensor],
                w_gate_EDF: Tensor, w_up_EDF: Tensor, w_down_EFD: Tensor) -> Tensor:
        y_SD = x_SD.new_empty(x_SD.shape[0], w_down_EFD.shape[-1])
        saved: list[Tensor] = []  # h1, h2 (unless full), act, h (unless selective) of every expert
        start = 0
        for e, n in enumerate(rows_per_expert):
            x_nD = _rows(x_SD, order, start, n)
            h1_nF, h2_nF = x_nD @ w_gate_EDF[e], x_nD @ w_up_EDF[e]
            act_nF = F.silu(h1_nF)
            h_nF = act_nF * h2_nF
            if order is None:
                torch.mm(h_nF, w_down_EFD[e], out=y_SD.narrow(0, start, n))
            else:
                _put_rows(y_SD, order, start, h_nF @ w_down_EFD[e])
            if recompute == "none":
                saved += [h1_nF, h2_nF, act_nF, h_nF]
            elif recompute == "selective":
                saved += [h1_nF, h2_nF]
            start += n
        ctx.rows_per_expert, ctx.kept = rows_per_expert, {"none": 4, "selective": 2, "full": 0}[recompute]
        # Through save_for_backward, not a ctx attribute: autograd frees them after backward.
        ctx.save_for_backward(x_SD, order, w_gate_EDF, w_up_EDF, w_down_EFD, *saved)
        return y_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_SD: Tensor):
        x_SD, order, w_gate_EDF, w_up_EDF, w_down_EFD, *saved = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        grad_x_SD = torch.empty_like(x_SD) if need_x else None
        grads = [torch.empty_like(w) if need_w else None for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
        grad_y_SD = grad_y_SD.contiguous()
        start = 0
        for e, n in enumerate(ctx.rows_per_expert):
            x_nD, dy_nD = _rows(x_SD, order, start, n), _rows(grad_y_SD, order, start, n)
            kept = saved[ctx.kept * e:ctx.kept * (e + 1)]
            h1_nF, h2_nF = kept[:2] if kept else (x_nD @ w_gate_EDF[e], x_nD @ w_up_EDF[e])
            if ctx.kept == 4:
                act_nF, h_nF = kept[2:]
            else:
                act_nF = F.silu(h1_nF)
                h_nF = act_nF * h2_nF
            dh_nF = dy_nD @ w_down_EFD[e].t()
            dh1_nF = torch.ops.aten.silu_backward(dh_nF * h2_nF, h1_nF)
            dh2_nF = dh_nF * act_nF
            if need_w:
                torch.mm(h_nF.t(), dy_nD, out=grads[2][e])
                torch.mm(x_nD.t(), dh1_nF, out=grads[0][e])
                torch.mm(x_nD.t(), dh2_nF, out=grads[1][e])
            if need_x:
                dx_nD = grad_x_SD.narrow(0, start, n) if order is None else x_nD.new_empty(n, x_nD.shape[1])
                torch.mm(dh1_nF, w_gate_EDF[e].t(), out=dx_nD)
                dx_nD.addmm_(dh2_nF, w_up_EDF[e].t())
                if order is not None:
                    _put_rows(grad_x_SD, order, start, dx_nD)
            start += n
        needs = ctx.needs_input_grad
        return (grad_x_SD, None, None, None, *(g if n else None for g, n in zip(grads, needs[4:])))


def swiglu_fused_loop(x_SD: Tensor, rows_per_expert: list[int], w_gate_EDF: Tensor, w_up_EDF: Tensor,
                      w_down_EFD: Tensor, recompute: str = "none", order: Optional[Tensor] = None) -> Tensor:
    """CPU fast path: per expert (SiLU(x W_gate) * x W_up) W_down over its rows, as one autograd node.

    Rows are grouped by expert, or, with `order`, expert e's rows are x[order[a:b]] for its span [a, b)
    of `rows_per_expert`, and its outputs land in the same positions: received rows (grouped by source
    rank) are regrouped inside the loop, one expert at a time while they are in cache, instead of
    by two whole-tensor gathers and their scatters in backward."""
    weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
    graph = torch.is_grad_enabled() and (x_SD.requires_grad or any(w.requires_grad for w in weights))
    # Without a graph nothing is kept: evaluation holds one expert's activations at a time.
    return _SwiGLULoop.apply(x_SD, list(rows_per_expert), recompute if graph else "full", order, *weights)
