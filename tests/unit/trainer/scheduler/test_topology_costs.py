"""What the cost model and planner make of machines: bytes that leave a machine per dispatch, machines per
token under a routing bound, and the planner's choice of flat or hierarchical dispatch per MoE layer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moeyard import configs
from moeyard.models import ModelConfig, MoEConfig
from moeyard.models.config import SigmoidBiasSettings
from moeyard.trainer.config.sections import read_config
from moeyard.trainer.scheduler.cost_model import build_step, predict, workload_for
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.machines import expected_nodes_per_token, machine_bound
from moeyard.trainer.scheduler.planner import search
from moeyard.trainer.scheduler.routing_bound import routing_bound_rows
from moeyard.trainer.scheduler.run_planning import load_hardware


def layer_workload(dim: int, ffn: int, experts: int, top_k: int, ep: int, bound=None, tokens: int = 4096):
    cfg = ModelConfig(vocab_size=1024, dim=dim, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=ffn, max_seq_len=4096,
                      moe=MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=ffn, max_nodes_per_token=bound))
    return workload_for(cfg, tokens=tokens, seq_len=4096, ep=ep, dp=ep, micro_steps=1, act_bytes=2, ranks_per_node=8)


@pytest.mark.parametrize("experts,top_k,machines,bound", [(256, 8, 8, None), (256, 8, 8, 4), (64, 2, 4, None),
                                                         (128, 8, 16, 2)])
def test_expected_machines_per_token_match_sampling(experts, top_k, machines, bound) -> None:
    """Uniform routing within each token's `bound` allowed machines, sampled: the formula within 2%."""
    g = torch.Generator().manual_seed(0)
    per = experts // machines
    allowed = machines if bound is None else bound
    picks = torch.rand(20000, allowed * per, generator=g).topk(top_k, dim=-1).indices // per
    sampled = (1 + (picks.sort(-1).values.diff(dim=-1) != 0).sum(-1)).float().mean()
    assert expected_nodes_per_token(experts, top_k, machines, bound) == pytest.approx(float(sampled), rel=0.02)
    assert expected_nodes_per_token(experts, top_k, 1, bound) == 1.0


def test_bytes_off_the_machine_flat_and_hierarchical() -> None:
    w = layer_workload(1024, 512, 256, 8, ep=64)  # 8 machines of 8
    assert w.ep_nodes == 8
    # a pair's row carries 8 float32-exact weights (3 bf16 columns each) and 8 expert ids
    row, packed = 1024 * 2, (1024 + 3 * 8 + 8) * 2
    assert w.cross_node_bytes("flat") == pytest.approx(4096 * 8 * 7 / 8 * row)
    assert w.cross_node_bytes("hierarchical") == pytest.approx(4096 * w.nodes_per_token * 7 / 8 * packed)
    bounded = layer_workload(1024, 512, 256, 8, ep=64, bound=1)
    assert bounded.nodes_per_token == 1.0
    assert bounded.cross_node_bytes("hierarchical") == pytest.approx(4096 * 7 / 8 * packed)  # once per token
    assert bounded.cross_node_bytes("flat") == w.cross_node_bytes("flat")  # a row per copy: no byte saved
    assert w.in_node_bytes == pytest.approx(4096 * 8 * 7 / 8 * row)
    one_machine = layer_workload(1024, 512, 256, 8, ep=8)
    assert one_machine.ep_nodes == 1 and one_machine.cross_node_bytes("flat") == 0


def test_hierarchical_chunks_fan_out_around_their_experts() -> None:
    """Each chunk: its packed rows cross (comm), fan out inside the machine, compute, fan in, cross back;
    the next chunk's rows cross while this one computes."""
    costs = HardwareCosts(load_hardware("dgx-h100"))
    w = layer_workload(1024, 512, 256, 8, ep=64)
    plan = dataclasses.replace(search(w, costs)[0], chunks=(2, 2), dispatch=("hierarchical",) * 2)
    timeline = build_step(w, plan, costs).run(costs.overlap_slowdown)
    task = {t.name: t for t in timeline.tasks}
    for phase in ("fwd", "bwd"):
        tag = f"L1.moe.{phase}"
        order = [f"{tag}.a2a_in0", f"{tag}.a2a_node_in0", f"{tag}.experts0", f"{tag}.a2a_node_out0",
                 f"{tag}.a2a_out0"]
        assert all(task[a].end <= task[b].start + 1e-12 for a, b in zip(order, order[1:]))
        assert task[f"{tag}.a2a_in1"].start < task[f"{tag}.experts0"].end  # overlapped
        assert task[f"{tag}.a2a_in0"].seconds == pytest.approx(
            costs.staged_all_to_all(w, w.cross_node_bytes("hierarchical") / 2, "cross"))


def test_planner_takes_hierarchical_where_dedup_pays_and_flat_where_it_does_not() -> None:
    """DeepSeek-V3's layer (top-8 of 256) bounded to 4 of 8 machines halves the bytes that cross: hierarchical.
    Mixtral's top-2 saves little, and the packed weights and ids and the fan-out inside the machine cost
    more: flat."""
    costs = HardwareCosts(load_hardware("dgx-h100"))
    both = ("flat", "hierarchical")
    deepseek = layer_workload(7168, 2048, 256, 8, ep=64, bound=4)
    plan, best = search(deepseek, costs, dispatch_choices=both)
    assert plan.dispatch == ("hierarchical",) * 2
    assert best.step < predict(deepseek, dataclasses.replace(plan, dispatch=()), costs).step
    mixtral = layer_workload(4096, 14336, 64, 2, ep=64)
    assert search(mixtral, costs, dispatch_choices=both)[0].dispatch == ()


def test_moeyard_plan_rows_for_routing_bounds() -> None:
    cfg = read_config(configs.path("tiny.yaml"), ["parallel.ep=64", "model.moe.num_experts=64", "model.moe.top_k=8",
                                                  "train.global_batch_tokens=1048576", "model.dim=1024",
                                                  "model.moe.ffn_dim=2048"])
    from moeyard.trainer.scheduler.run_planning import workload

    hw = load_hardware("dgx-h100")
    w = workload(cfg, 64, hw.act_bytes, hw.devices_per_node)
    rows = routing_bound_rows(cfg, w, HardwareCosts(hw))
    assert [r["bound"] for r in rows] == [1, 2, 4, None]
    machines = [r["nodes_per_token"] for r in rows]
    assert machines == sorted(machines) and machines[0] == 1.0 and machines[-1] > 4
    hierarchical = [r for r in rows if r["dispatch"].startswith("hierarchical")]
    assert hierarchical and hierarchical[0]["bound"] == 1
    assert rows[0]["step_s"] < rows[-1]["step_s"]  # one machine per token: the fewest bytes cross


def test_groups_on_whole_machines_bound_the_machines_a_token_reaches() -> None:
    """DeepSeek-V3's 8 groups, top 4, on 8 machines: at most 4 machines per token even without
    max_nodes_per_token; groups that straddle machines bound nothing."""
    deepseek = MoEConfig(num_experts=256, top_k=8, router="sigmoid_bias",
                         sigmoid_bias=SigmoidBiasSettings(n_groups=8, topk_groups=4))
    assert machine_bound(deepseek, 8, None) == 4 and machine_bound(deepseek, 8, 2) == 2
    assert machine_bound(deepseek, 16, None) is None  # 8 groups over 16 machines: each spans two
    assert machine_bound(MoEConfig(num_experts=256, top_k=8), 8, None) is None
    cfg = ModelConfig(vocab_size=1024, dim=256, n_layers=1, n_heads=8, n_kv_heads=8, ffn_dim=256, max_seq_len=4096,
                      moe=deepseek)
    w = workload_for(cfg, tokens=4096, seq_len=4096, ep=64, dp=64, micro_steps=1, act_bytes=2, ranks_per_node=8)
    assert w.nodes_per_token == pytest.approx(expected_nodes_per_token(256, 8, 8, 4)) and w.nodes_per_token < 4
