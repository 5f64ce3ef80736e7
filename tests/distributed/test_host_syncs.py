"""The GPU path's host-sync budget, counted on CPU (helpers.host_syncs): none per MoE layer at ep=1, one
per layer forward at ep>1 (the split sizes), whatever the pipeline degree; none in backward (hierarchical
dispatch: tests/distributed/test_hierarchical.py). Capacity
mode adds one per layer (how many copies are kept is data)."""
from __future__ import annotations

import pytest
import torch
from helpers import sync_cases
from helpers.host_syncs import counting_host_syncs
from helpers.multiprocess import run_distributed

LAYERS = sync_cases.MOE_LAYERS


def test_the_counter_sees_every_kind_of_sync() -> None:
    x, counts = torch.randn(6), torch.tensor([2, 0, 4])
    with counting_host_syncs() as syncs:
        x.tolist()
        x.cpu()
        x[x > 0]
        int(x[0])
        torch.repeat_interleave(counts)
        torch.tensor([1, 2])
        x.nonzero()
    assert syncs.count == 7, syncs
    with counting_host_syncs() as syncs:
        torch.repeat_interleave(counts, output_size=6)
        x.index_select(0, counts)
        torch.tensor(3.0)
        host = x.cpu()
    assert syncs.count == 1, syncs
    with counting_host_syncs() as syncs:
        host = x.cpu()
        host.sum(0).tolist()  # already on the host: free
        host[host > 0]
    assert syncs.count == 1, syncs


@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid_bias", "dense_to_sparse", "expert_choice"])
@pytest.mark.parametrize("capacity_factor,per_layer", [(None, 0), (1.0, 1)])
def test_ep1_layers_never_wait_for_the_host(capacity_factor, per_layer, router) -> None:
    per_layer = 0 if router == "expert_choice" else per_layer  # its own sort keeps a fixed number per expert
    model = sync_cases.tiny_model(capacity_factor, router)
    result = sync_cases.count_step(model, torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert result["forward"] == per_layer * LAYERS, result["where"]
    assert result["backward"] == 0, result["where"]


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("capacity_factor,per_layer", [(None, 1), (1.0, 2)])
def test_ep2_layers_wait_once_for_the_split_sizes(chunks, capacity_factor, per_layer) -> None:
    for result in run_distributed(sync_cases.count_step_at_ep, 2, chunks, capacity_factor):
        assert result["forward"] == per_layer * LAYERS, result["where"]
        assert result["backward"] == 0, result["where"]
