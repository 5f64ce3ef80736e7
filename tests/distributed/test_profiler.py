"""The profiler measures on real gloo groups, every rank plans from one profile, and it is cached."""
from __future__ import annotations

from helpers import profiler_cases
from helpers.multiprocess import run_distributed


def test_profiler_measures_real_groups_and_caches(tmp_path) -> None:
    results = run_distributed(profiler_cases.profile_and_cache, 2, str(tmp_path))
    profile = results[0]["first"]
    assert all(r["first"] == profile and r["again"] == profile for r in results), "ranks must plan from one profile"
    # measured, then read from the cache, then measured again once the cache file is corrupt (no hang)
    assert [r["cached"] for r in results] == [(False, True, False), (False, True, False)]
    assert profile.dense_fwd_s > 0 and profile.dense_bwd_s > 0 and profile.optimizer_s > 0
    assert profile.experts_fwd[1] > 0 and profile.experts_bwd[1] > 0  # time per row
    assert sum(profile.all_to_all) > 0 and sum(profile.all_reduce_dp) > 0
    assert profile.all_reduce_edp == (0.0, 0.0)  # edp has one rank at world 2, ep 2: nothing to reduce
    assert profile.overlap_slowdown >= 1.0
    assert len(list(tmp_path.glob("profile-*.json"))) == 1


def test_profile_times_both_stages_of_hierarchical_dispatch() -> None:
    for r in run_distributed(profiler_cases.profile_two_machines, 4, timeout_s=240):
        assert sum(r["node"]) > 0 and sum(r["cross"]) > 0, r
        assert r["cross_s"] == r["cross_expected"] and r["node_s"] == r["node_expected"]  # 2 ranks a group
