"""Meta-device initialisation: every layout starts from the plain model's values, each rank holding its part."""
from __future__ import annotations

import pytest
from helpers import init_cases
from helpers.multiprocess import run_distributed


@pytest.mark.parametrize("world,ep,fsdp,peft", [
    (4, 2, True, False),  # the case: 4 ranks, ep=2, fsdp
    (4, 4, True, True),  # with routed LoRA adapters drawn after the base
    (2, 2, False, False),  # replicated dense, ep-sharded experts
    (1, 1, False, True),
])
def test_sharded_initialisation_equals_the_single_process_model(world, ep, fsdp, peft) -> None:
    results = run_distributed(init_cases.sharded_init_equals_plain_construction, world, ep, fsdp, peft)
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], f"rank {rank}: parameters differ from build_model(cfg): {r['mismatched']}"
        assert r["rng_equal"], f"rank {rank}: the generator is not where plain construction leaves it"
        assert r["buffers_equal"] and r["tied"]
        if fsdp:  # each rank holds about 1/world of everything
            assert r["local_fraction"] < 1.5 / world, r["local_fraction"]
