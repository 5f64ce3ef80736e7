"""The SFT step on several ranks equals one process on the same global batch."""
from __future__ import annotations

import pytest
from helpers.multiprocess import run_distributed
from helpers.sft_cases import sft_step_matches_reference


@pytest.mark.parametrize("world,ep,layout", [(2, 2, "pack"), (2, 1, "pad")])
def test_sft_step_on_ranks_matches_one_process(world: int, ep: int, layout: str) -> None:
    results = run_distributed(sft_step_matches_reference, world, ep, layout, timeout_s=120)
    assert results[0] == results[1]
