"""Expert pruning of a trained run: keeping every expert reproduces the model; half the experts report the
held-out cost and train at ep=1 and ep=2; uneven budgets per layer."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers.runs import read_metrics, train_forked, write_config

from moeyard.errors import ConfigError
from moeyard.models import build_model
from moeyard.tools.prune import mean_loss, prune
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.store import read_manifest
from moeyard.trainer.config.resolve import resolve_run
from moeyard.trainer.config.sections import build_config
from moeyard.trainer.data.blend import TokenBatches


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("prune")
    train_forked(write_config(root / "c.yaml", small_corpus, train={"steps": 4}), root / "run", 1,
                  "parallel.ep=1")
    step = (root / "run" / "checkpoints" / "latest").read_text().strip()
    return root, root / "run" / "checkpoints" / step


def test_keeping_every_expert_reproduces_the_model(trained, small_corpus) -> None:
    root, ckpt = trained
    report = prune(ckpt, str(small_corpus), 8, root / "all")
    assert report["heldout_loss_after"] == report["heldout_loss_before"]
    assert all(ids == list(range(8)) for ids in report["kept_experts"].values())


def test_half_the_experts_report_the_cost_and_train_at_ep1_and_ep2(trained, small_corpus) -> None:
    root, ckpt = trained
    out = root / "half"
    proc = subprocess.run([sys.executable, "-m", "moeyard", "prune", str(root / "run"), "--data", str(small_corpus),
                           "--keep", "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out loss" in proc.stdout and f"--init {out}" in proc.stdout
    manifest = read_manifest(out)
    assert manifest["config"]["model"]["moe"]["num_experts"] == 4
    kept = manifest["source"]["pruned"]["kept_experts"]
    assert len(kept) == 2 and all(len(ids) == 4 for ids in kept.values())

    config = write_config(root / "tune.yaml", small_corpus, train={"steps": 3})
    tree = yaml.safe_load(config.read_text())
    del tree["model"]  # the model comes from the pruned checkpoint
    config.write_text(yaml.safe_dump(tree))
    train_forked(config, root / "t1", 1, "parallel.ep=1", f"checkpoint.init={out}")
    train_forked(config, root / "t2", 2, "parallel.ep=2", f"checkpoint.init={out}")
    for a, b in zip(read_metrics(root / "t2"), read_metrics(root / "t1")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len(read_metrics(root / "t1")) == 3

    with pytest.raises(ConfigError, match="keeping 1 experts in MoE layer 1: it must be between model.moe.top_k=2"):
        prune(ckpt, str(small_corpus), 1, root / "bad")


def test_an_uneven_budget_per_layer_trains_at_ep2(trained, small_corpus) -> None:
    root, ckpt = trained
    report = prune(ckpt, str(small_corpus), [2, 6], root / "uneven")
    assert [len(ids) for ids in report["kept_experts"].values()] == [2, 6]
    manifest = read_manifest(root / "uneven")
    assert manifest["config"]["model"]["moe"]["num_experts_per_layer"] == [2, 6]
    cfg = build_config(manifest["config"])
    pruned = build_model(cfg.model).eval()
    load_full_model(root / "uneven", pruned)
    assert [moe.experts.w_up_EDF.shape[0] for _, moe in pruned.moe_layers()] == [2, 6]
    trained_cfg = build_config(read_manifest(ckpt)["config"])  # prune cut windows as its training run did
    windows = TokenBatches(small_corpus, trained_cfg.train.seq_len, 8, 0, 1, seed=trained_cfg.run.seed)
    heldout = [windows.batch(i).tokens_BT1 for i in range(8, 12)]  # after the 8 calibration batches
    assert mean_loss(pruned, heldout) == pytest.approx(report["heldout_loss_after"], rel=1e-6)

    config = write_config(root / "uneven.yaml", small_corpus, train={"steps": 2})
    tree = yaml.safe_load(config.read_text())
    del tree["model"]
    config.write_text(yaml.safe_dump(tree))
    train_forked(config, root / "u2", 2, "parallel.ep=2", f"checkpoint.init={root / 'uneven'}")
    assert [len(load) for load in read_metrics(root / "u2")[0]["expert_load"].values()] == [2, 6]

    with pytest.raises(ConfigError, match="--keep-per-layer has 3 counts for the 2 MoE layers"):
        prune(ckpt, str(small_corpus), [2, 4, 6], root / "bad")
    with pytest.raises(ConfigError, match="do not split evenly over parallel.ep=4"):
        resolve_run(config, [f"checkpoint.init={root / 'uneven'}", "parallel.ep=4"])
