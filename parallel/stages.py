"""Which decoder blocks each pipeline stage holds and which stages each rank runs: shared by the pipeline
itself (parallel/pipeline.py) and the cost and memory models, which must not import torch's pipelining
(and through it torch._dynamo) to plan a run."""
from __future__ import annotations


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """The decoder blocks of each stage: as even as the count allows, a spare block going to the stages
    after the first and before the last first (those two also run the embedding, or the output and loss)."""
    base, spare = divmod(n_layers, pp)
    takes_spare = [*range(1, pp - 1), pp - 1, 0][:spare]
    sizes = [base + (s in takes_spare) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def stage_ids(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stages rank `pp_rank` holds, looped: r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(per_rank)]
