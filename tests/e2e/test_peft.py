"""Routed LoRA adapters through `moeyard train`: only adapters train, equal at ep=1 and ep=2; a run from a
base checkpoint saves only the adapters."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.runs import final_parameters, initial_parameters, read_metrics, train_forked, write_config

from moeyard.errors import CheckpointError
from moeyard.trainer.checkpoint.store import content_hash, read_manifest, resolve_init


def _bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.iterdir())


def test_lora_moe_trains_only_adapters_and_matches_at_ep1_and_ep2(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 4})
    peft = ["model.peft.method=lora_moe", "model.peft.rank=4", "optim.lr=0.01"]
    proc = train_forked(config, tmp_path / "ep1", 1, "parallel.ep=1", *peft)
    train_forked(config, tmp_path / "ep2", 2, "parallel.ep=2", *peft)
    cfg, final_ep1 = final_parameters(tmp_path / "ep1")
    _, final_ep2 = final_parameters(tmp_path / "ep2")
    init = initial_parameters(cfg)
    adapters = {n for n in init if ".adapter." in n}
    trainable = sum(init[n].numel() for n in adapters)
    total = sum(p.numel() for p in init.values())
    assert adapters and f"parameters: {trainable:,} of {total:,} train" in proc.stdout
    for a, b in zip(read_metrics(tmp_path / "ep2"), read_metrics(tmp_path / "ep1")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # The adapters' routers report like the MoE routers: every token's 2 copies, over the global batch.
        assert sorted(a["adapter_routers"]) == sorted(n.removesuffix(".router.weight_ED") for n in adapters
                                                      if n.endswith(".router.weight_ED"))
        for name, values in a["adapter_routers"].items():
            assert sum(values["load"]) == 512 * 2 and values["load"] == b["adapter_routers"][name]["load"]
            assert 0 < values["entropy"] <= math.log(4) and values["aux_loss"] > 0
            assert values["load_balance"]["max_over_mean"] >= 1
    for name, p0 in init.items():
        if name not in adapters:
            assert torch.equal(final_ep1[name], p0) and torch.equal(final_ep2[name], p0), name
            continue
        update = final_ep1[name] - p0
        assert update.norm() > 0, f"{name} did not train"
        assert (final_ep2[name] - p0 - update).norm() / update.norm() < 1e-5, name


def test_adapters_start_from_a_base_checkpoint_and_save_only_themselves(tmp_path, small_corpus) -> None:
    """--init of a checkpoint without adapters: the base loads, the adapters start fresh, so the first
    step's loss is the base model's loss on the same batch. The tuned run's checkpoints hold the adapters
    only, refer to the base by path and content hash, and resume (at another world size) to the same
    weights as a run without a break; a replaced base is refused by name."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 2})
    train_forked(config, tmp_path / "base", 1, "parallel.ep=1")
    init = f"checkpoint.init={tmp_path / 'base'}"
    train_forked(config, tmp_path / "plain", 1, "parallel.ep=1", init, "model.moe.aux_loss_coef=0")
    tuned = [init, "model.moe.aux_loss_coef=0", "model.peft.method=rank1_moe", "model.peft.aux_loss_coef=0"]
    train_forked(config, tmp_path / "tuned", 1, "parallel.ep=1", *tuned)
    plain, tuned_metrics = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "tuned")
    assert tuned_metrics[0]["lm_loss"] == pytest.approx(plain[0]["lm_loss"], rel=1e-6)

    train_forked(config, tmp_path / "split", 1, "parallel.ep=1", "train.stop_at=1", *tuned)
    first = tmp_path / "split" / "checkpoints" / "step_000001"
    manifest = read_manifest(first)
    base = resolve_init(tmp_path / "base")
    assert manifest["base"] == {"path": str(base.resolve()), "content_hash": content_hash(read_manifest(base))}
    meta = dcp.FileSystemReader(str(first)).read_metadata().state_dict_metadata
    saved = {k[len("model."):] for k in meta if k.startswith("model.")}
    assert saved and all(".adapter." in n for n in saved)
    assert _bytes(first) < _bytes(base) / 3
    train_forked(config, tmp_path / "split", 2, "parallel.ep=2", *tuned)  # resumes from the adapters
    _, straight = final_parameters(tmp_path / "tuned")
    _, resumed = final_parameters(tmp_path / "split")
    for name, p in straight.items():
        assert torch.allclose(resumed[name], p, rtol=1e-5, atol=1e-7), name
    _, base_weights = final_parameters(tmp_path / "base")
    assert all(torch.equal(resumed[n], p) for n, p in base_weights.items())

    # Tuning on from the adapter checkpoint: the new run refers to it (and through it to the base) and
    # still saves the adapters only.
    train_forked(config, tmp_path / "more", 1, "parallel.ep=1", "train.steps=1", *tuned[1:],
                  f"checkpoint.init={tmp_path / 'split'}")
    more = resolve_init(tmp_path / "more")
    assert read_manifest(more)["base"]["path"] == str(resolve_init(tmp_path / "split").resolve())
    assert {k for k in dcp.FileSystemReader(str(more)).read_metadata().state_dict_metadata
            if k.startswith("model.")} == {f"model.{n}" for n in saved}

    shutil.move(tmp_path / "base", tmp_path / "moved")
    shutil.copytree(tmp_path / "plain", tmp_path / "base")  # another checkpoint where the base was
    with pytest.raises(CheckpointError, match="content hash .* it was replaced or changed"):
        final_parameters(tmp_path / "split")
