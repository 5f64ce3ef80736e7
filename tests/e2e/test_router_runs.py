"""Every router trains end to end through `moeyard train`: its shipped config on the test corpus, and
the same global batch at ep=1 on 1 process vs ep=2 on 2 (and ep=4 on 4) -- same losses, routing and
updates within 1e-5, as the core equivalence tests demand of the default router.

expert_choice is not here: it ranks near-equal router probabilities of all tokens of a sequence, so the
last-bit differences of a reordered reduction flip some picks after a few steps and the runs drift
apart (measured: grad norm 3e-6 off at step 2, 4e-5 at step 4). Its equivalence is checked one step at a
time against plain backprop in test_routers.py, where the parameters are the same.

sigmoid_bias's and dense_to_sparse's runs compute in micro-batches of 4 sequences (one rank's share at 4 processes): the
1-process reference accumulates 4 of them, each rank at ep=2 two, at ep=4 one. The dense layers then do
the same arithmetic in every layout, and what is compared is expert parallelism itself: the exchange,
the experts' grouping, routing and the gradient reduction. This is the same run because everything its
router computes is per sequence (the sequence-wise balance loss) or per step (the biases follow the
step's whole load; dense_to_sparse's temperature follows the step); that accumulating equals one big batch is
test_equivalence's. dense_to_sparse against a one-micro-batch reference: tok_embeddings' update 1.01e-5 apart
at ep=2 on an AVX-512 CPU (over RTOL); 1.9e-6 from the equal-micro-batch one. sigmoid_bias measured at ep=4:
parameter updates 6.2e-6 apart (relative) from a one-micro-batch reference on this machine, 1.44e-5 on
CI's CPU (float32 rounding of differently shaped GEMMs, through Adam); 9.3e-7 here from the
equal-micro-batch one. The other routers' load-balance loss takes the load of the global micro-batch,
which accumulation would change, so they keep the one-micro-batch reference."""
from __future__ import annotations

import math

import pytest
from helpers.runs import assert_same_run, read_metrics, train_forked, write_config

from moeyard import configs

CONFIGS = {"topk_softmax": "tiny.yaml", "switch": "tiny-switch.yaml", "expert_choice": "tiny-expert-choice.yaml",
           "sigmoid_bias": "tiny-sigmoid-bias.yaml", "dense_to_sparse": "tiny-dense-to-sparse.yaml"}
SHORT = ["train.steps=3", "train.global_batch_tokens=1024", "train.seq_len=64", "log.every=1",
         "checkpoint.every=0", "log.progress=false"]
EQUIVALENCE = [
    ("switch", ["model.moe.router=switch", "model.moe.top_k=1"], [(2, 2)]),
    ("sigmoid_bias", ["model.moe.router=sigmoid_bias", "model.moe.bias_update_rate=0.01",
                      "model.moe.balance_loss=sequence", "model.moe.aux_loss_coef=0.001",
                      "model.moe.n_groups=4", "model.moe.topk_groups=2", "train.micro_batch_size=4"],
     [(2, 2), (4, 4)]),
    ("dense_to_sparse", ["model.moe.router=dense_to_sparse", "model.moe.dts_steps=4",
                         "model.moe.balance_loss=sequence", "train.micro_batch_size=4"], [(2, 2)]),
]


@pytest.mark.parametrize("router", sorted(CONFIGS))
def test_shipped_router_config_trains_and_reports_its_routing(tmp_path, small_corpus, router) -> None:
    extra = ["model.moe.dts_steps=2"] if router == "dense_to_sparse" else []
    train_forked(configs.path(CONFIGS[router]), tmp_path / "run", 2, f"data.dir={small_corpus}", *SHORT, *extra)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert math.isfinite(m["loss"])
        assert set(m["router"]) == set(m["expert_load"]) and m["router"], "no per-layer router metrics"
        for layer, values in m["router"].items():
            assert values["z_loss"] > 0 and 0 < values["entropy"] <= math.log(len(m["expert_load"][layer])) + 1e-6
    last = metrics[-1]
    if router == "expert_choice":  # balanced by construction, nothing dropped, no balance loss
        assert all(len(set(load)) == 1 for load in last["expert_load"].values())
        assert all(v["aux_loss"] == 0 for v in last["router"].values())
        # ...but a token may be picked by no expert: that is reported, not hidden.
        assert all(0 < f < 1 for f in last["unrouted_fraction"].values())
    if router in ("topk_softmax", "sigmoid_bias", "dense_to_sparse"):  # dropless token choice
        assert all(f == 0 for m in metrics for f in m["unrouted_fraction"].values())
    if router == "sigmoid_bias":  # the biases moved, and are logged
        assert all(len(v["expert_bias"]) == 16 and any(b != 0 for b in v["expert_bias"])
                   for v in last["router"].values())
    if router == "dense_to_sparse":  # as the forward used them: all 8 experts at step 1, 5, then top-2
        assert [m["router"]["1"]["experts_per_token"] for m in metrics] == [[8.0], [5.0], [2.0]]
    if router == "switch":  # top-1: one routed copy per token; capacity 1.25 drops some of the overflow
        assert all(sum(load) == 1024 for load in last["expert_load"].values())
        assert any(f > 0 for m in metrics for f in m["dropped_fraction"].values()), "capacity dropped nothing"


@pytest.mark.parametrize("router,settings,layouts", EQUIVALENCE, ids=[e[0] for e in EQUIVALENCE])
def test_router_is_the_same_under_expert_parallelism(tmp_path, small_corpus, router, settings, layouts) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus)
    train_forked(config, tmp_path / "ref", 1, "parallel.ep=1", *settings)
    for nproc, ep in layouts:
        train_forked(config, tmp_path / f"ep{ep}", nproc, f"parallel.ep={ep}", *settings)
        assert_same_run(tmp_path / "ref", tmp_path / f"ep{ep}", f"{router}: {nproc} processes ep={ep}")
        for ref, got in zip(read_metrics(tmp_path / "ref"), read_metrics(tmp_path / f"ep{ep}")):
            for layer, values in ref["router"].items():  # aux, z, entropy, and the biases (buffers, not params)
                for key, value in values.items():
                    assert got["router"][layer][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (layer, key)
