"""End-to-end runs of the ways users start training, each in a subprocess with a timeout."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from helpers.runs import cli_in_process, moeyard_train, read_metrics, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEP_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
             "predicted_step_s", "peak_memory_gb", "expert_load",
             "expert_load_balance", "dropped_fraction", "unrouted_fraction", "router"}


def test_train_writes_metrics_tensorboard_and_checkpoints(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, log={"every": 2, "tensorboard": True},
                          train={"steps": 4}, checkpoint={"every": 2})
    run_dir = tmp_path / "run"
    proc = moeyard_train(config, run_dir, 2, "parallel.ep=2", "model.moe.capacity_factor=1.0")
    assert "finished 4 steps" in proc.stdout

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 4]
    for m in metrics:
        assert STEP_KEYS <= set(m)
        assert set(m["expert_load"]) == {"1", "2"}  # block 0 is dense
        assert all(len(counts) == 8 and sum(counts) == 512 * 2 for counts in m["expert_load"].values())
        assert all(0 <= f < 1 for f in m["dropped_fraction"].values())
        assert m["tokens_per_s"] > 0 and m["lr"] > 0
        assert 0.05 < m["peak_memory_gb"] < 24, "a worker's peak resident set, in GB"
    assert "model state per rank (ep shards the experts evenly): parameters" in proc.stdout
    assert any(f > 0 for m in metrics for f in m["dropped_fraction"].values()), "capacity 1.0 never dropped"

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert {"train/loss", "train/grad_norm", "train/peak_memory_gb", "moe/layer_1/dropped_fraction"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 4]
    hist = events.Histograms("moe/layer_1/expert_load")[-1].histogram_value
    assert list(hist.bucket) == metrics[-1]["expert_load"]["1"]

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    for step in ("step_000002", "step_000004"):
        manifest = json.loads((checkpoints / step / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and manifest["ep"] == 2
        for f in manifest["files"]:
            assert (checkpoints / step / f["name"]).stat().st_size == f["bytes"]
    assert not list(checkpoints.glob(".*.tmp"))
    assert (run_dir / "config.yaml").is_file()


def test_torchrun_module_entry_point(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moeyard.train", str(config), "--set", f"run.dir={tmp_path / 'run'}", "--set", "parallel.ep=2",
           "--set", "parallel.timeout_s=120"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_single_process_without_launcher(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 2})
    proc = subprocess.run([sys.executable, "-m", "moeyard.train", str(config), "--set", f"run.dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(read_metrics(tmp_path / "r")) == 2


def test_existing_run_is_not_overwritten(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 1})
    moeyard_train(config, tmp_path / "run", 1, "parallel.ep=1")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    base = ["train", str(config), "--set", f"run.dir={tmp_path / 'run'}", "--set", "parallel.ep=1"]
    again = subprocess.run([sys.executable, "-m", "moeyard", *base], capture_output=True, text=True,
                           timeout=120)  # resume=auto: the one-process worker finds the run finished
    assert again.returncode == 0 and "nothing to do: the run is at step 1" in again.stdout, again.stderr
    fresh = cli_in_process(base + ["--resume", "none"], tmp_path, {})  # refused before any worker
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_default_command_prepares_the_stdlib_corpus_and_trains(tmp_path) -> None:
    """`moeyard train` with no config: tiny.yaml, 2 processes, the Python stdlib as corpus."""
    env = {**os.environ, "MOEYARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moeyard", "train", "--set", "train.steps=2",
                           "--set", f"run.dir={tmp_path / 'tiny'}", "--set", "train.global_batch_tokens=2048"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "on 2 process(es) (world 2), ep=2" in proc.stdout and "prepared" in proc.stdout
    meta = json.loads(next((tmp_path / "cache" / "data").glob("python-stdlib-*/meta.json")).read_text())
    assert meta["documents"] > 500 and meta["tokens"] > 5_000_000
    assert [m["step"] for m in read_metrics(tmp_path / "tiny")] == [1, 2]  # first and last


def test_worker_failure_is_reported_with_ranks_and_exit_codes(tmp_path, small_corpus) -> None:
    """A run that fails inside the workers (here: NCCL asked for on a machine without GPUs) ends with a summary."""
    config = write_config(tmp_path / "c.yaml", small_corpus)
    proc = subprocess.run([sys.executable, "-m", "moeyard", "train", str(config), "--nproc", "2", "--set",
                           "parallel.ep=2", "--set", "parallel.backend=nccl", "--set", f"run.dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert "parallel.backend=nccl needs a GPU" in proc.stderr
    # torchrun stops the other worker once one fails, so only one exit code is certain to be ours (2).
    summary = re.search(r"training workers failed \((rank 0 exit code -?\d+), (rank 1 exit code -?\d+)\)",
                        proc.stderr)
    assert summary and "exit code 2" in summary.group(0), proc.stderr
    # Every worker refusing the input exits like the CLI does on bad input (2); otherwise a plain failure (1).
    codes = {summary.group(1).split()[-1], summary.group(2).split()[-1]}
    assert proc.returncode == (2 if codes == {"2"} else 1), proc.stderr
