"""Node-limited routing and hierarchical dispatch through `moeyard train`: 4 processes as 2 machines x 2
learn what 1 process learns (losses, routing, updates within 1e-5 over 5 steps)."""
from __future__ import annotations

import os
import sys

import pytest
from helpers.runs import assert_same_run, read_metrics, train_forked, write_config

NODE_LIMITED = ("model.moe.max_nodes_per_token=1", "model.moe.routing_nodes=2", "train.steps=5")
TWO_MACHINES = ("parallel.ep=4", "parallel.ranks_per_node=2")


@pytest.fixture(scope="module")
def node_limited(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("node_limited")
    config = write_config(root / "small.yaml", small_corpus)
    train_forked(config, root / "ep1", 1, "parallel.ep=1", *NODE_LIMITED)
    return config, root / "ep1"


def test_node_limited_routing_is_the_same_at_ep1_and_ep4(node_limited, tmp_path) -> None:
    """Flat, and hierarchical with chunks 2 and fsdp, both as 1 process; under M=1 (top-2, dropless) a token
    that crosses does so twice with flat dispatch and once with hierarchical (its row packed with the copies'
    weights and expert ids), and the logged bytes say so."""
    config, reference = node_limited
    runs = {"flat": ("schedule.dispatch=flat",),
            "hierarchical": ("schedule.dispatch=hierarchical", "schedule.mode=manual", "schedule.chunks=2",
                             "parallel.fsdp=true")}
    crossed = {}
    for name, extra in runs.items():
        proc = train_forked(config, tmp_path / name, 4, *TWO_MACHINES, *NODE_LIMITED, *extra)
        assert ("hierarchical dispatch in 2 of 2 MoE layers" in proc.stdout) == (name == "hierarchical")
        assert_same_run(reference, tmp_path / name, f"node-limited ep=1 vs ep=4 on 2x2, {name}")
        metrics = read_metrics(tmp_path / name)
        for m in metrics:
            assert all(r["nodes_per_token"] == 1.0 for r in m["router"].values()), m["router"]
        crossed[name] = [[r["cross_machine_mb"] for r in m["router"].values()] for m in metrics]
    assert all(mb > 0 for step in crossed["flat"] for mb in step)
    packed = (64 + 2 * 2) / 64  # model.dim 64, and a pair's row carries its 2 weights and 2 expert ids
    for flat, hier in zip(crossed["flat"], crossed["hierarchical"]):
        assert hier == pytest.approx([mb / 2 * packed for mb in flat], rel=1e-12), crossed


def test_unlimited_routing_reaches_both_machines(node_limited, tmp_path) -> None:
    """Without the bound the same model sends tokens to both halves of the experts (the metric is live)."""
    config, _ = node_limited
    train_forked(config, tmp_path / "free", 1, "parallel.ep=1", "model.moe.routing_nodes=2", "train.steps=2")
    for m in read_metrics(tmp_path / "free"):
        assert all(1.0 < r["nodes_per_token"] <= 2.0 for r in m["router"].values()), m["router"]


def test_two_hosts_with_hierarchical_dispatch_learn_what_one_process_learns(node_limited, tmp_path) -> None:
    """Two network namespaces of 2 workers each: the launcher's local world size makes them 2 machines, the
    cross-machine rows go over the veth pair."""
    from helpers.launches import run_nodes
    from helpers.netns import hosts

    config, reference = node_limited
    sets = [arg for o in (*NODE_LIMITED, "parallel.ep=4", "schedule.dispatch=hierarchical",
                          f"run.dir={tmp_path / 'run'}", "parallel.timeout_s=60") for arg in ("--set", o)]
    logs = [tmp_path / f"host{rank}.log" for rank in (0, 1)]
    with hosts() as (a, b):
        commands = [host.command(sys.executable, "-m", "moeyard", "train", str(config), "--nnodes", "2",
                                 "--node-rank", str(rank), "--nproc", "2", "--rdzv-endpoint", f"{a.address}:29400",
                                 "--local-addr", host.address, *sets)
                    for rank, host in enumerate((a, b))]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        run_nodes(commands, logs, [{**env, "GLOO_SOCKET_IFNAME": host.interface} for host in (a, b)],
                  timeout_s=300)
    assert "hierarchical dispatch in 2 of 2 MoE layers" in logs[0].read_text()
    assert_same_run(reference, tmp_path / "run", "2 hosts x 2 workers, hierarchical, vs 1 process")
