"""Frozen parameters through `moeyard train`: the same training at ep=1 and ep=2; a resume that would train
what has no optimizer state is refused with the fix."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.runs import (
    final_parameters,
    initial_parameters,
    read_metrics,
    run_moeyard_train,
    train_forked,
    write_config,
)

FROZEN_MOE = ["train.frozen=['*.experts.*', '*.router.*']"]
RTOL = 1e-5


def optimizer_state_names(run_dir) -> set[str]:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    keys = dcp.FileSystemReader(str(run_dir / "checkpoints" / step)).read_metadata().state_dict_metadata
    return {k[len("optim."):].rsplit(".", 1)[0] for k in keys if k.startswith("optim.")}


@pytest.mark.parametrize("sync", ["schedule.grad_sync=all_reduce", "schedule.grad_sync=reduce_scatter",
                                  "parallel.fsdp=true"])
def test_frozen_moe_base_trains_the_same_at_ep1_and_ep2(tmp_path, small_corpus, sync: str) -> None:
    """Experts and routers frozen, the rest trains: ep=2 with bucketed, overlapped reduction (all-reduce,
    or ZeRO's reduce-scatter), or FSDP2 with frozen and trainable parameters in one unit, equals ep=1; frozen weights never move, have no optimizer state and no
    gradient bucket."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 4})
    ref = train_forked(config, tmp_path / "ep1", 1, "parallel.ep=1", *FROZEN_MOE)
    train_forked(config, tmp_path / "ep2", 2, "parallel.ep=2", *FROZEN_MOE, "schedule.mode=manual",
                  "schedule.bucket_mb=0.05", sync)
    cfg, final_ref = final_parameters(tmp_path / "ep1")
    _, final_ep2 = final_parameters(tmp_path / "ep2")
    init = initial_parameters(cfg)
    frozen = {n for n in init if ".experts." in n or ".router." in n}
    assert frozen and len(frozen) < len(init)
    total, trainable = sum(p.numel() for p in init.values()), sum(init[n].numel() for n in init if n not in frozen)
    assert f"parameters: {trainable:,} of {total:,} train" in ref.stdout

    for a, b in zip(read_metrics(tmp_path / "ep2"), read_metrics(tmp_path / "ep1")):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL) and a["expert_load"] == b["expert_load"]
    for name, p0 in init.items():
        if name in frozen:
            assert torch.equal(final_ref[name], p0) and torch.equal(final_ep2[name], p0), name
            continue
        update_ref, update_ep2 = final_ref[name] - p0, final_ep2[name] - p0
        assert update_ref.norm() > 0, name
        assert (update_ep2 - update_ref).norm() / update_ref.norm() < RTOL, name

    trained = set(init) - frozen
    assert optimizer_state_names(tmp_path / "ep1") == trained
    assert optimizer_state_names(tmp_path / "ep2") == trained
    plan = json.loads((tmp_path / "ep2" / "plan.json").read_text())
    assert plan["expert_buckets"] == [] and sum(plan["dense_buckets"]) == len(trained)


def test_resuming_with_more_to_train_is_refused_with_the_fix(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 4})
    train_forked(config, tmp_path / "run", 1, "parallel.ep=1", *FROZEN_MOE, "train.stop_at=2",
                  "checkpoint.every=2")
    proc = run_moeyard_train(config, tmp_path / "run", 1, "parallel.ep=1")
    assert proc.returncode != 0
    assert "frozen when it was saved" in proc.stdout + proc.stderr
    assert "train.trainable/train.frozen" in proc.stdout + proc.stderr
