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
