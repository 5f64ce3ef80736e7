"""sigmoid_bias (aux-loss-free) balancing over 200 training steps: it evens out a skewed router."""
from __future__ import annotations

import pytest


@pytest.mark.timeout(360)
def test_sigmoid_bias_balances_a_skewed_router_within_200_steps(small_corpus) -> None:
    """The tiny config's model cut to 3 blocks (2 MoE layers: still a worst of layers, at 3/4 the compute) with
    a quarter of its global batch in short sequences (2048 tokens: 32 x 64, aux loss off; the balancing is per
    step: a smaller batch only makes each step's load noisier, and 32 sequences of 64 are less so than 8 of
    256, at half the compute of 4096 tokens) from a router that sends nearly every token to experts 0 and 1:
    the biases alone (rate 0.003) bring the worst MoE layer's max/mean expert load below 1.3 (first at step 75
    here), and keep it there (1.26 over the last 20 steps here; deterministic on CPU). One process: that the
    ranks update the biases from the global load alike is the pipeline and fsdp equivalence tests' (their
    sigmoid_bias cases equal one process); 2 ranks here took a third more of the suite's CPU."""
    from helpers.multiprocess import run_distributed
    from helpers.router_cases import sigmoid_bias_balances

    worst = run_distributed(sigmoid_bias_balances, 1, str(small_corpus), 200, 0.003, 4.0, 64, 32,
                            timeout_s=300)[0]["worst_max_over_mean"]
    assert worst[0] > 3.0, f"the initial router is not skewed: max/mean {worst[0]:.2f}"
    below = [step for step, w in enumerate(worst, start=1) if w < 1.3]
    settled = sum(worst[-20:]) / 20
    print(f"sigmoid_bias: worst-layer max/mean {worst[0]:.2f} at step 1, first below 1.3 at step "
          f"{below[0] if below else None}, mean over steps 181-200 {settled:.3f}")
    assert below, f"never below 1.3 in 200 steps: {worst[::10]}"
    assert settled < 1.3, f"not settled: mean max/mean over the last 20 steps {settled:.3f}"
