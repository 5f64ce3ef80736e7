"""The run's check of its plan: slower than r=1 by more than noise switches back, on every rank alike."""
from __future__ import annotations

import pytest
from helpers.multiprocess import run_distributed
from helpers.plan_check_cases import plan_check_decides_alike


@pytest.mark.parametrize("plan_ms,reference_ms,switched", [
    # The slowest rank decides: rank 1's plan steps are 10% slower than its reference steps.
    ([[10, 10, 10], [10, 11, 11]], [[10, 10, 10], [10, 10, 10]], True),
    ([[10, 10, 10], [10, 10.2, 10]], [[10, 10, 10], [10, 10, 10]], False),  # 2% is noise: keep the plan
    ([[8, 8, 8], [8, 8, 8]], [[10, 10, 10], [10, 10, 10]], False),  # the plan wins
])
def test_plan_check_switches_back_only_when_the_plan_is_slower(plan_ms, reference_ms, switched) -> None:
    results = run_distributed(plan_check_decides_alike, 2, plan_ms, reference_ms)
    for r in results:
        assert r["switched"] is switched
        assert r["plan_s"] == pytest.approx(max(sorted(ms)[1] for ms in plan_ms) / 1e3)
        # Warm-up and the plan's steps at (4, 2); the reference's steps at r=1; then the decision.
        assert r["degrees"][:4] == [[4, 2]] * 4 and r["degrees"][5:7] == [[1, 1]] * 2
        assert r["degrees"][-1] == ([1, 1] if switched else [4, 2])
        assert r["again"] is None and r["off_check"] is None  # decides once; nothing to check at r=1
    assert results[0] == results[1]


def test_a_lost_trial_teaches_the_cached_profile(tmp_path) -> None:
    from helpers.plan_check_cases import profile_learns_the_chunk_cost

    (r,) = run_distributed(profile_learns_the_chunk_cost, 1, str(tmp_path))
    # Measured 0.2 s slower where 0.1 s faster was predicted, over (3 + 1) extra chunks x fwd and bwd.
    assert r["overhead"] == pytest.approx(0.3 / (r["micro_steps"] * 2 * 4))
    assert "cost per extra pipeline chunk 0.000 ->" in r["message"]
    assert r["replanned"] == (1, 1, 1)
