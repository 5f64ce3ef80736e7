"""Which decoder blocks each pipeline stage holds and which stages each rank runs: shared by the pipeline
itself (parallel/pipeline.py) and the cost and memory models, which must not import torch's pipelining
(and through it torch._dynamo) to plan a run."""
from __future__ import annotations

from typing import Optional, Sequence


def stage_layers(n_layers: int, stages: int, sizes: Optional[Sequence[int]] = None) -> list[range]:
    """The decoder blocks of each stage: `sizes` blocks each (parallel.layers_per_stage), else as even as the
    count allows, a spare block going to the stages after the first and before the last first (those two
    also run the embedding, or the output and loss)."""
    if not sizes:
        base, spare = divmod(n_layers, stages)
        takes_spare = [*range(1, stages - 1), stages - 1, 0][:spare]
        sizes = [base + (s in takes_spare) for s in range(stages)]
    if len(sizes) != stages or sum(sizes) != n_layers or min(sizes) < 1:
        raise ValueError(f"{list(sizes)} blocks per stage for {stages} stages of {n_layers} blocks")
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def stage_ids(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stages rank `pp_rank` holds, looped: r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(per_rank)]


def rank_layers(n_layers: int, pp: int, per_rank: int = 1, sizes: Optional[Sequence[int]] = None) -> list[range]:
    """What the cost and memory models take each pipeline rank to hold: as many decoder blocks as its stages
    (stage_layers of pp x per_rank stages), as one run of blocks in rank order. Exact with one stage per rank;
    a looped rank's blocks are spread through the model, of the same count."""
    spans = stage_layers(n_layers, pp * per_rank, sizes)
    totals = [sum(len(spans[s]) for s in stage_ids(r, pp, per_rank)) for r in range(pp)]
    return stage_layers(n_layers, pp, totals)


def rank_split(totals: Sequence[int], per_rank: int) -> list[int]:
    """parallel.layers_per_stage (pp x per_rank stages, in stage order) that gives pipeline rank r `totals[r]`
    blocks, as even as can be over its stages; a rank's spare blocks go to different loops than its
    neighbours', so that no loop of the schedule takes them all."""
    pp = len(totals)
    sizes = [0] * (pp * per_rank)
    for r, n in enumerate(totals):
        for v, s in enumerate(stage_ids(r, pp, per_rank)):
            sizes[s] = n // per_rank + ((v + r) % per_rank < n % per_rank)
    return sizes
