"""sigmoid_bias (aux-loss-free) balancing over 200 training steps: it evens out a skewed router."""
from __future__ import annotations

import pytest


@pytest.mark.timeout(360)
def test_sigmoid_bias_balances_a_skewed_router_within_200_steps(small_corpus) -> None:
    """The tiny config's model cut to 3 blocks (2 MoE layers: still a worst of layers, at 3/4 the compute) with
    a quarter of its global batch in short sequences (2048 tokens: 32 x 64, aux loss off; the balancing is per
    step: a smaller batch only makes each step's load noisier, and 32 sequences of 64 are less so than 8 of
    256, at half the compute of 4096 tokens) from a router that sends nearly every token to experts 0 and 1:
    the biases alone (rate 0.003) bring the worst MoE layer's max/mean expert load below 1.3 (first at step 75)
    and balance the load of the last 20 steps, summed, to within 1.15 of the mean (1.11 on an AVX-512 machine;
    3.98 over the first 20 steps). Each step's own max/mean stays noisy whatever the biases do: the step's
    text moves the load (1.12-1.86 over the last 60 steps there); its mean over the last 20 steps, which this
    test asserted below 1.3, was 1.26 on the machine it was written on and 1.305 on that one, at the floor of
    that noise (rates 0.002 and 0.005 gave 1.28 and 1.27), so it is held below 1.4 only (biases that swung the
    load from one side to the other would balance the sum and not the steps). One process: that
    the ranks update the biases from the global load alike is the pipeline and fsdp equivalence tests' (their
    sigmoid_bias cases equal one process); 2 ranks here took a third more of the suite's CPU."""
    from helpers.multiprocess import run_distributed
    from helpers.router_cases import sigmoid_bias_balances

    result = run_distributed(sigmoid_bias_balances, 1, str(small_corpus), 200, 0.003, 4.0, 64, 32, timeout_s=300)[0]
    worst = result["worst_max_over_mean"]

    def summed_max_over_mean(steps: list[dict]) -> float:
        """The worst layer's max/mean of the load summed over `steps`."""
        ratios = []
        for layer in steps[0]:
            total_E = [sum(step[layer][e] for step in steps) for e in range(len(steps[0][layer]))]
            ratios.append(max(total_E) * len(total_E) / sum(total_E))
        return max(ratios)

    first, last = summed_max_over_mean(result["loads"][:20]), summed_max_over_mean(result["loads"][-20:])
    below = [step for step, w in enumerate(worst, start=1) if w < 1.3]
    print(f"sigmoid_bias: worst-layer max/mean {worst[0]:.2f} at step 1, first below 1.3 at step "
          f"{below[0] if below else None}, per step over steps 181-200 {sum(worst[-20:]) / 20:.3f}; summed "
          f"load of steps 1-20 {first:.3f}, of steps 181-200 {last:.3f}")
    assert worst[0] > 3.0 and first > 3.0, f"the initial router is not skewed: max/mean {worst[0]:.2f}, {first:.2f}"
    assert below, f"never below 1.3 in 200 steps: {worst[::10]}"
    assert last < 1.15, f"not balanced: the last 20 steps' summed load has max/mean {last:.3f}"
    # and not by swinging from one side to the other: each step stays near the floor of the text's noise
    assert sum(worst[-20:]) / 20 < 1.4, f"balanced on average only: per-step max/mean {worst[-20:]}"
