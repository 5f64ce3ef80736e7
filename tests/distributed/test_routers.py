"""Every router's step gradients under expert parallelism equal plain backprop of the global batch."""
from __future__ import annotations

import pytest

ROUTERS = ["topk_softmax", "switch", "expert_choice", "sigmoid_bias", "dense_to_sparse"]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("world", [2, 4])
def test_one_step_gradients_under_expert_parallelism_equal_plain_backprop(router: str, world: int) -> None:
    """ep=2 and ep=4 against the single-process model on the same global batch: every gradient, the grad
    norm and the loss within 1e-4 (see helpers/step_cases.py). The multi-step end-to-end runs are in
    test_router_runs.py."""
    from helpers.multiprocess import run_distributed
    from helpers.step_cases import step_gradients_match_single_process

    balance = "sequence" if router == "sigmoid_bias" else "batch"
    aux = 0.0 if router == "expert_choice" else 0.01
    results = run_distributed(step_gradients_match_single_process, world, world, 2, aux, router, balance)
    assert len({r["grad_norm"] for r in results}) == 1, "ranks disagree on the global grad norm"
