"""One training step over real gloo groups: gradients equal plain backprop of the global batch; a
non-finite gradient on one rank skips the step on every rank."""
from __future__ import annotations

import pytest
from helpers import step_cases
from helpers.multiprocess import run_distributed


@pytest.mark.parametrize("world,ep,micro_batch_size,aux_loss_coef", [
    (2, 2, 2, 0.01), (4, 4, 2, 0.01), (4, 2, 2, 0.01), (2, 1, 2, 0.01),
    (4, 2, 1, 0.0),  # two accumulated micro-steps per rank
])
def test_step_gradients_equal_single_process_backprop(world, ep, micro_batch_size, aux_loss_coef) -> None:
    """Gradient scaling and reduction checked directly against plain backprop of the global batch."""
    results = run_distributed(step_cases.step_gradients_match_single_process, world, ep, micro_batch_size,
                              aux_loss_coef)
    assert len({r["grad_norm"] for r in results}) == 1, "ranks disagree on the global grad norm"


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere() -> None:
    results = run_distributed(step_cases.nonfinite_step_is_skipped, 2)
    for r in results:
        assert r["skipped"] == (True, False)
        assert r["unchanged_after_bad"] and r["changed_after_good"]
        assert r["optimizer_steps"] == 1
