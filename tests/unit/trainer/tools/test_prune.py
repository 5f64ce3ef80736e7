"""Expert pruning that keeps every expert reproduces the model exactly."""
from __future__ import annotations

import pytest
from helpers.runs import moeyard_train, write_config

from moeyard.trainer.tools.prune import prune


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
