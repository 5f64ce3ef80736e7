"""Machines in the run's layout, checked before any worker starts; routing nodes resolved from them."""
from __future__ import annotations

import pytest

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config.node_layout import check_node_layout, node_layout_notes, ranks_per_machine, with_node_layout
from moeyard.trainer.config.sections import read_config


def tiny(*overrides: str):
    return read_config(configs.path("tiny.yaml"), list(overrides))


def test_routing_nodes_come_from_the_machines_an_ep_group_spans() -> None:
    cfg = with_node_layout(tiny("parallel.ep=8", "model.moe.max_nodes_per_token=1"), 8, 2)
    assert cfg.parallel.ranks_per_node == 2 and cfg.model.moe.routing_nodes == 4
    fixed = with_node_layout(tiny("parallel.ep=8", "model.moe.max_nodes_per_token=2", "model.moe.routing_nodes=8"),
                             8, 2)
    assert fixed.model.moe.routing_nodes == 8  # finer blocks than machines: each still on one machine
    assert with_node_layout(tiny("parallel.ep=2"), 4, 4).model.moe.routing_nodes is None  # no bound: untouched
    assert with_node_layout(tiny("parallel.ep=4", "parallel.ranks_per_node=2"), 4, 4).parallel.ranks_per_node == 2


@pytest.mark.parametrize("overrides,world,ranks_per_node,message", [
    (("parallel.ep=2",), 6, 4, "does not divide the world size 6"),
    (("parallel.ep=4",), 12, 6, "must fill whole machines or fit in one"),
    (("parallel.ep=8", "model.moe.max_nodes_per_token=1", "model.moe.routing_nodes=2"), 8, 2,
     "routing_nodes=2 does not keep each routing node on one machine"),
    (("parallel.ep=4", "schedule.dispatch=hierarchical"), 4, 4, "needs an ep group that spans machines"),
    (("parallel.ep=2", "parallel.pp=4"), 24, 8, r"stages of 6 ranks \(dp x ep\) on machines of 8 ranks: .* "
     r"use parallel.pp in \[1, 3\]"),
])
def test_layouts_that_cannot_work_are_refused(overrides, world, ranks_per_node, message) -> None:
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_node_layout(cfg, world, ranks_per_node)


@pytest.mark.parametrize("pp,world,ranks_per_node", [(2, 16, 8), (4, 8, 4), (4, 8, 1), (4, 4, 2)])
def test_stages_that_fill_machines_or_share_one_are_accepted(pp, world, ranks_per_node) -> None:
    """pp across machines (each stage on 1 or 2 whole machines), or several stages to a machine."""
    check_node_layout(tiny("parallel.ep=1", f"parallel.pp={pp}"), world, ranks_per_node)


def test_the_launcher_says_what_a_layout_leaves_unbounded() -> None:
    groups = tiny("parallel.ep=8", "model.moe.router=sigmoid_bias", "model.moe.n_groups=2", "model.moe.topk_groups=1")
    assert any("do not each sit on one of the 4 machines" in n for n in node_layout_notes(groups, 2))
    assert node_layout_notes(groups, 4) == []  # 2 groups on 2 machines
    useless = tiny("parallel.ep=2", "model.moe.max_nodes_per_token=1")
    assert any("has no effect" in n for n in node_layout_notes(useless, 2))
    logged = with_node_layout(tiny("parallel.ep=4"), 4, 2)
    assert logged.model.moe.routing_nodes == 2 and logged.model.moe.max_nodes_per_token is None


def test_machines_from_where_ranks_run() -> None:
    assert ranks_per_machine(["a", "a", "b", "b"]) == 2
    assert ranks_per_machine(["a"] * 4) == 4
    assert ranks_per_machine(["a", "b", "a", "b"]) is None  # cyclic
    assert ranks_per_machine(["a", "a", "b"]) is None  # uneven
    assert ranks_per_machine(["a", "a", "b", "b", "a", "a"]) is None  # a machine in two blocks
