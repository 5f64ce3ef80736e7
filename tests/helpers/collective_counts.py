"""Counting the torch.distributed collectives a block of code calls (FSDP2 calls `all_gather_single` and
`reduce_scatter_single` by these names, so patching them sees every unit's gather and reduction)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


@contextmanager
def counting_collectives(names: tuple[str, ...] = ("all_gather_single", "reduce_scatter_single")
                         ) -> Iterator[dict[str, int]]:
    """How often each collective in `names` is called inside the block, by name."""
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(dist, name) for name in names}

    def counting(name: str):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
