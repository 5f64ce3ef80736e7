"""`moeyard slurm` scripts run on a real Slurm (one node, started by the fixture): they train like a local
run, and a SIGUSR1 before the time limit leads to a checkpoint, a requeue and a resume to the last step."""
from __future__ import annotations

import os
import sys
import time

import pytest

from runs import read_metrics, write_config
from slurm_cluster import SlurmCluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        cluster.env.update(OMP_NUM_THREADS="1", MOEYARD_CACHE=str(cluster.root / "cache"))
        yield cluster
    finally:
        cluster.stop()


def submit(slurm: SlurmCluster, config, run_dir, *options: str) -> str:
    out = slurm.run(sys.executable, "-m", "moeyard", "slurm", str(config), "--nodes", "1", "--gpus-per-node", "0",
                    "--nproc-per-node", "2", "--set", f"run.dir={run_dir}", *options, "--submit")
    return out.strip()


def test_scontrol_expands_node_lists(slurm) -> None:
    from moeyard.launch.env import scontrol_hostnames

    os.environ["SLURM_CONF"] = str(slurm.conf)
    try:
        assert scontrol_hostnames("gpu[01-03],cpu7") == ["gpu01", "gpu02", "gpu03", "cpu7"]
    finally:
        del os.environ["SLURM_CONF"]


def test_sbatch_with_one_task_per_worker_trains_like_a_local_run(slurm, tmp_path, launch_reference) -> None:
    config, reference = launch_reference
    job = submit(slurm, config, tmp_path / "run", "--layout", "srun")
    state = slurm.wait_until_done(job, timeout_s=240)
    log = (tmp_path / "run" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    # Same config, seed and world size as the reference: Slurm's ranks must be the same ranks, bit for bit.
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == reference, log


def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm, tmp_path, small_corpus) -> None:
    steps = 1000
    config = write_config(tmp_path / "c.yaml", small_corpus, parallel={"ep": 2}, train={"steps": steps})
    run_dir = tmp_path / "run"
    job = submit(slurm, config, run_dir)  # torchrun layout: `moeyard train` forwards USR1 to its workers
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, f"no training progress:\n{slurm.logs()}"
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 does before the time limit

    state = slurm.wait_until_done(job, timeout_s=300)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    assert slurm.job_field(job, "Restarts") == "1", log
    saved = int(log.split("received SIGUSR1: saved step ")[1].split(",")[0])
    assert 3 <= saved < steps, log
    assert f"resumed from {run_dir}/checkpoints/step_{saved:06d} at step {saved}" in log, log
    assert "restart 1" in log and f"finished {steps} steps" in log, log
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
