"""What activation checkpointing keeps for backward (train.recompute).

- none: everything autograd saves.
- selective: the outputs of GEMMs (and each region's inputs); the cheap ops between them -- norms, RoPE,
  attention's core, activation functions, the SwiGLU product, residual adds -- run again in backward.
  Megatron-Core's selective recompute (core attention, norms, activations) as an op-level policy, like
  torchtitan's. Its regions never hold a collective: the MoE layer's exchange runs outside them and keeps its
  buffers, so backward never repeats an all-to-all (full does). Attention's core is recomputed whole: with a
  flash kernel that is its forward pass again, a few percent of a block's FLOPs at long sequences.
- experts: the routed experts keep only their input rows and run their MLPs again (2 GEMMs of 9 more).
- full: each block keeps only its input and runs again, all-to-alls included.
"""
from __future__ import annotations

import threading
from typing import Callable, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RecomputeMode = Literal["none", "selective", "experts", "full"]
RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "experts", "full")
"""From keeping the most to keeping the least (for MoE blocks, whose expert activations dominate)."""

_aten = torch.ops.aten
_GEMMS = frozenset({_aten.mm.default, _aten.addmm.default, _aten._grouped_mm.default, _aten._scaled_mm.default,
                    _aten._scaled_grouped_mm.default})
"""Ops whose outputs selective recompute keeps: the GEMMs with a weight matrix (linear layers, LoRA and the
expert loop decompose to mm/addmm; the grouped experts run _grouped_mm; under train.fp8 both run the scaled
ones). Not bmm: only attention's math kernel (SDPA's fallback) runs it, and its [T, T] scores are what
selective recomputes. FP8's casts run again in backward (their outputs are not kept), the GEMMs not."""


def _keep_gemm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def _gemm_policy_contexts():
    return create_selective_checkpoint_contexts(_keep_gemm_outputs)


def selective_checkpoint(fn: Callable, *args):
    """`fn(*args)`, keeping only its GEMM outputs and its inputs for backward. `fn` must not run a collective
    (the recomputation would run it again, on one rank's schedule)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_gemm_policy_contexts)


_blocks = threading.local()


class _RecomputedBlock:
    """Marks this thread inside a block_checkpoint region; re-enterable (checkpoint may recompute a region once
    per backward graph that unpacks it)."""

    def __init__(self) -> None:
        self.outer: list[bool] = []

    def __enter__(self) -> None:
        self.outer.append(getattr(_blocks, "inside", False))
        _blocks.inside = True

    def __exit__(self, *exc) -> None:
        _blocks.inside = self.outer.pop()


def _block_contexts() -> tuple[_RecomputedBlock, _RecomputedBlock]:
    return _RecomputedBlock(), _RecomputedBlock()


def block_checkpoint(fn: Callable, *args):
    """`fn(*args)` keeping only its inputs (train.recompute=full), its forward and its recomputation marked
    (in_recomputed_block), so that code keeping tensors outside autograd's saved ones can keep none."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_block_contexts)


def in_recomputed_block() -> bool:
    """Whether this thread runs inside a block_checkpoint region: its forward, or its recomputation in backward.
    Tensors saved through save_for_backward there are dropped after the forward and come back recomputed
    (detached); a Python reference (an executor's per-chunk graphs) would hold them for every micro-batch in
    flight, which the memory model does not count."""
    return getattr(_blocks, "inside", False)
