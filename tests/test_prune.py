"""Expert pruning: all experts kept is the same model; half kept reports its held-out loss and trains at
ep=1 and ep=2 like any checkpoint."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from moeyard.trainer.checkpoint_store import read_manifest
from moeyard.trainer.prune import prune
from runs import moeyard_train, read_metrics, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("prune")
    moeyard_train(write_config(root / "c.yaml", small_corpus, train={"steps": 4}), root / "run", 1,
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
    moeyard_train(config, root / "t1", 1, "parallel.ep=1", f"checkpoint.init={out}")
    moeyard_train(config, root / "t2", 2, "parallel.ep=2", f"checkpoint.init={out}")
    for a, b in zip(read_metrics(root / "t2"), read_metrics(root / "t1")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len(read_metrics(root / "t1")) == 3

    with pytest.raises(Exception, match="--keep 1 must be between model.moe.top_k=2"):
        prune(ckpt, str(small_corpus), 1, root / "bad")
