"""StepStats: what a step reports is found by name, whatever the layers, adapters and micro-steps."""
from __future__ import annotations

import pytest
import torch

from moeyard.models import MoEStats
from moeyard.models.peft.adapters import AdapterStats
from moeyard.trainer.stats import NamedSums, StepStats


def _moe(load: list[int], dropped: int, unrouted: int, aux: float, z: float, entropy: float) -> MoEStats:
    t = torch.tensor
    return MoEStats.done(tokens_per_expert_E=t(load), dropped=t(dropped), unrouted=t(unrouted), skipped=t(0),
                    aux_loss=t(aux), z_loss=t(z), entropy=t(entropy))


def _add_micro_step(stats: StepStats, scale: float, lm_sum: float) -> None:
    """Layers of different sizes (a pruned model) and one routed adapter, numbers scaled per micro-step."""
    moe = {1: _moe([3, 1], 1, 0, 1.0 * scale, 2.0 * scale, 0.5), 3: _moe([1, 1, 2], 0, 2, 3.0, 4.0, 0.7)}
    adapters = {"layers.0.attn.wq.adapter": AdapterStats(torch.tensor(1.5 * scale), torch.tensor([2, 6]),
                                                         torch.tensor(0.3))}
    stats.add_lm(torch.tensor(lm_sum))
    stats.add_forward(moe, adapters, aux_loss=torch.tensor(0.5 * scale), z_loss=torch.tensor(0.25 * scale))


def test_report_sums_micro_steps_and_finds_every_number_by_name() -> None:
    stats = StepStats()
    _add_micro_step(stats, 1.0, 8.0)
    _add_micro_step(stats, 3.0, 4.0)
    assert stats.losses_finite()
    assert stats.expert_load(3).tolist() == [2, 2, 4] and stats.expert_load(3).dtype == torch.int64
    report = stats.report(micro_steps=2, global_targets=6, global_tokens=10, router_state={1: {"bias": [0.1]}})
    assert report["lm_loss"] == pytest.approx(12.0 / 6)
    assert report["aux_loss"] == pytest.approx((0.5 + 1.5) / 2) and report["z_loss"] == pytest.approx(0.5)
    assert report["expert_load"] == {1: [6, 2], 3: [2, 2, 4]}  # ints, as the metrics write them
    assert report["dropped_fraction"] == {1: pytest.approx(2 / 8), 3: 0.0}
    assert report["unrouted_fraction"] == {1: 0.0, 3: pytest.approx(4 / 10)}
    assert report["router"][1] == {"aux_loss": pytest.approx(2.0), "z_loss": pytest.approx(4.0),
                                   "entropy": pytest.approx(0.5), "bias": [0.1]}
    assert report["router"][3]["entropy"] == pytest.approx(0.7)
    assert report["adapter_routers"] == {"layers.0.attn.wq.adapter": {
        "load": [4, 12], "aux_loss": pytest.approx(3.0), "entropy": pytest.approx(0.3)}}


def test_a_nonfinite_loss_is_seen() -> None:
    stats = StepStats()
    _add_micro_step(stats, 1.0, float("nan"))
    assert not stats.losses_finite()


def test_named_sums_unpack_by_name_after_one_host_transfer() -> None:
    sums = NamedSums(torch.float64)
    sums.add("a", torch.tensor([1.0, 2.0]))
    sums.add("b", torch.tensor(5.0))
    sums.add("a", torch.tensor([0.5, 0.5]))
    assert sums.to_host() == {"a": [1.5, 2.5], "b": [5.0]}
