"""Which decoder blocks each pipeline stage holds and which stages each rank runs: shared by the pipeline
itself (parallel/pipeline.py) and the cost and memory models, which must not import torch's pipelining
(and through it torch._dynamo) to plan a run."""
from __future__ import annotations

from itertools import accumulate
from typing import Optional, Sequence


def stage_layers(n_layers: int, stages: int, sizes: Optional[Sequence[int]] = None) -> list[range]:
    """The decoder blocks of each stage: `sizes` blocks each (parallel.layers_per_stage), else as even as the
    count allows, a spare block going to the stages after the first and before the last first (those two
    also run the embedding, or the output and loss). Every stage holds at least one block but the last, which
    may hold none: its final norm, MTP depths, output layer and loss are a stage's work of their own (Megatron-Core's
    documented DeepSeek-V3 layout, "Et*3|(tt|)*29,m|L", ends in a stage of the MTP layer and one of the loss)."""
    if not sizes:
        base, spare = divmod(n_layers, stages)
        takes_spare = [*range(1, stages - 1), stages - 1, 0][:spare]
        sizes = [base + (s in takes_spare) for s in range(stages)]
    if len(sizes) != stages or sum(sizes) != n_layers or min(sizes[:-1], default=1) < 1 or sizes[-1] < 0:
        raise ValueError(f"{list(sizes)} blocks per stage for {stages} stages of {n_layers} blocks")
    starts = accumulate(sizes[:-1], initial=0)  # the stage search calls this ~10^6 times for a 671B model
    return [range(a, a + n) for a, n in zip(starts, sizes)]


V_SHAPED = ("zbv_zero_bubble", "dualpipev")
"""schedule.pipeline: the schedules that place two stages a rank in a V, rank r holding stages r and 2 pp - 1 - r
(the first rank both ends of the model, the last the two middle stages)."""
SPLIT_BACKWARD = ("interleaved_zero_bubble", *V_SHAPED)
"""The schedules whose backward runs in input and weight steps (parallel/pipeline.py SPLIT_BACKWARD)."""


def stage_ids(pp_rank: int, pp: int, per_rank: int, v_shape: bool = False) -> list[int]:
    """The stages rank `pp_rank` holds, looped: r, r + pp, r + 2 pp, ...; or in a V (`v_shape`, per_rank 2):
    r and 2 pp - 1 - r."""
    if v_shape:
        assert per_rank == 2, "a V places two stages a rank"
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(per_rank)]


def holds_ends(pp_rank: int, pp: int, v_shape: bool = False) -> tuple[bool, bool]:
    """Whether pipeline rank `pp_rank` holds the first stage (the embedding) and the last (the output layer,
    loss and MTP depths): ranks 0 and pp - 1, or in a V rank 0 both."""
    return pp_rank == 0, pp_rank == (0 if v_shape else pp - 1)


def rank_layers(n_layers: int, pp: int, per_rank: int = 1, sizes: Optional[Sequence[int]] = None,
                v_shape: bool = False) -> list[Sequence[int]]:
    """What the cost and memory models take each pipeline rank to hold. In a V, exactly its two stages' blocks
    (the first rank's, the first blocks and the last); otherwise as many decoder blocks as its stages
    (stage_layers of pp x per_rank stages), as one run of blocks in rank order: exact with one stage per rank,
    a looped rank's blocks being spread through the model, of the same count."""
    spans = stage_layers(n_layers, pp * per_rank, sizes)
    if v_shape:
        return [tuple(b for s in stage_ids(r, pp, per_rank, True) for b in spans[s]) for r in range(pp)]
    totals = [sum(len(spans[s]) for s in stage_ids(r, pp, per_rank)) for r in range(pp)]
    return list(stage_layers(n_layers, pp, totals))


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
