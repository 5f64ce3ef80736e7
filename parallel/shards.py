"""How FSDP2 splits a tensor over its ranks: the dimension an expert parameter is sharded on and the largest
rank's share. Shared by parallel/fsdp.py, which shards, and the memory model, which plans a run without
importing FSDP or DTensor."""
from __future__ import annotations

from typing import Sequence


def expert_shard_dim(shape: Sequence[int], edp: int) -> int:
    """The dimension an expert parameter of this rank (`shape`: [E/ep, ...]) is sharded on over `edp`
    ranks: the first that splits evenly; dim 0 (padded by FSDP to its largest chunk) where none does."""
    return next((d for d, n in enumerate(shape) if n % edp == 0), 0)


def padded_shard_numel(shape: Sequence[int], dim: int, ranks: int) -> int:
    """Elements the largest rank holds of a tensor sharded on `dim` over `ranks` (FSDP2 pads every rank
    to the first chunk of `torch.chunk`)."""
    numel = 1
    for d, n in enumerate(shape):
        numel *= -(-n // ranks) if d == dim else n
    return numel
