"""Freezing patterns: what they select, a pattern that matches nothing, plans with every dense weight frozen."""
from __future__ import annotations

import re

import pytest
from helpers import REPO

from moeyard.errors import ConfigError
from moeyard.trainer.config.resolve import resolve_run
from moeyard.trainer.freezing import frozen_names, frozen_set
from moeyard.trainer.scheduler.cost_model import predict, workload_for
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.planner import reference_plan, search
from moeyard.trainer.scheduler.run_planning import load_hardware

NAMES = ["tok_embeddings.weight", "layers.0.attn.wq.weight", "layers.1.ffn.router.weight_ED",
         "layers.1.ffn.experts.w_gate_EDF", "output.weight"]
TINY = REPO / "configs" / "tiny.yaml"


def test_patterns_select_what_trains() -> None:
    assert frozen_names(NAMES, None, ["*.experts.*"]) == {"layers.1.ffn.experts.w_gate_EDF"}
    assert frozen_names(NAMES, ["layers.*"], ["*.router.*"]) == {
        "tok_embeddings.weight", "output.weight", "layers.1.ffn.router.weight_ED"}
    with pytest.raises(ConfigError, match=r"train.frozen pattern '\*.expert.\*' matches no parameter"):
        frozen_names(NAMES, None, ["*.expert.*"])
    with pytest.raises(ConfigError, match="leave no parameter to train"):
        frozen_names(NAMES, ["layers.*"], ["layers.*"])


def test_a_pattern_that_matches_nothing_fails_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=re.escape("train.trainable pattern 'layers.*.attention.*' matches no")):
        resolve_run(TINY, ["train.trainable=layers.*.attention.*"])
    cfg = resolve_run(TINY, ["train.trainable=layers.*.attn.*"])  # one pattern given as a plain string
    assert cfg.train.trainable == ["layers.*.attn.*"]
    cfg = resolve_run(TINY, ["train.frozen=*.experts.*"])  # not YAML (a leading * is an alias): taken as text
    assert cfg.train.frozen == ["*.experts.*"]


def test_planner_and_predictions_with_every_dense_parameter_frozen() -> None:
    cfg = resolve_run(TINY, ["train.trainable=*.experts.*"])
    w = workload_for(cfg.model, tokens=4096, seq_len=256, ep=2, dp=2, micro_steps=1,
                     frozen=frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen))
    assert w.params and all(p.expert for p in w.params)
    costs = HardwareCosts(load_hardware("cpu-2core"))
    assert reference_plan(w, "all_reduce").dense_buckets == ()
    assert predict(w, reference_plan(w, "all_reduce"), costs).step > 0
    plan, prediction = search(w, costs)
    assert plan.dense_buckets == () and prediction.step > 0


def test_every_pipeline_rank_trains_something() -> None:
    """The patterns are the whole model's on every stage; a pipeline rank none of whose parameters trains is
    refused before launch, naming it: a last stage of no block whose output layer is frozen (attention alone
    trains), or a stage whose blocks are all frozen. The stage balancer leaves the last stage a block there."""
    from moeyard.trainer.config.resolve import machines_of

    machines = machines_of(4, 4)
    with pytest.raises(ConfigError, match=r"pipeline rank 1 of parallel.pp=2 holds no block, the final norm and "
                                          r"output layer, and none of its parameters trains"):
        resolve_run(TINY, ["train.trainable=layers.*.attn.*", "parallel.pp=2", "parallel.layers_per_stage=[4,0]",
                           "train.micro_batch_size=2"], machines)
    with pytest.raises(ConfigError, match=r"pipeline rank 0 of parallel.pp=2 holds blocks \[0, 1\], the embedding"):
        resolve_run(TINY, ["train.trainable=layers.3.*", "parallel.pp=2", "train.micro_batch_size=2"], machines)
    resolve_run(TINY, ["train.trainable=layers.*.attn.*", "parallel.pp=2", "train.micro_batch_size=2"], machines)
    resolve_run(TINY, ["parallel.pp=2", "parallel.layers_per_stage=[4,0]", "train.micro_batch_size=2"], machines)
