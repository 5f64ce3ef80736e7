"""`moeyard slurm` scripts run on a real Slurm (one node, started by the fixture): they train like a local
run, and a SIGUSR1 before the time limit leads to a checkpoint, a requeue and a resume to the last step."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers.runs import cli_in_process, read_metrics, write_config
from helpers.slurm_cluster import SlurmCluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")).running() as cluster:
        yield cluster


def submit(slurm: SlurmCluster, config, run_dir, *options: str) -> str:
    out = slurm.run(sys.executable, "-m", "moeyard", "slurm", str(config), "--nodes", "1", "--gpus-per-node", "0",
                    "--nproc-per-node", "2", "--set", f"run.dir={run_dir}", *options, "--submit")
    return out.strip()


def render(tmp_path, small_corpus, *options: str, ep: int = 2) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "c.yaml", small_corpus, parallel={"ep": ep})
    return cli_in_process(["slurm", str(config), "--set", f"run.dir={tmp_path / 'run'}", *options], tmp_path,
                          {"MOEYARD_CACHE": str(tmp_path / "cache")})


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
    steps = 80  # the signal lands within a few steps of the third (step 13 here); a small model makes the rest quick
    config = write_config(tmp_path / "c.yaml", small_corpus, parallel={"ep": 2}, train={"steps": steps},
                          model={"dim": 32, "n_layers": 2, "ffn_dim": 64})
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


def test_torchrun_layout_script(tmp_path, small_corpus) -> None:
    proc = render(tmp_path, small_corpus, "--nodes", "2", "--gpus-per-node", "4", "--time", "24:00:00",
                  "--partition", "gpu", "--account", "proj", "--set", "train.steps=50", "--cpus-per-task", "32",
                  ep=8)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "-m moeyard train" in srun and "--nnodes 2 --nproc 4" in srun and "--set train.steps=50" in srun
    assert '--rdzv-endpoint "$head_node:$port"' in srun
    assert (tmp_path / "run").is_dir(), "Slurm does not create the folder of --output; moeyard slurm must"
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_srun_layout_script_starts_one_task_per_worker(tmp_path, small_corpus) -> None:
    proc = render(tmp_path, small_corpus, "--nodes", "2", "--gpus-per-node", "4", "--layout", "srun", ep=8)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --ntasks-per-node=4" in proc.stdout
    assert "-m moeyard.train" in proc.stdout and 'export MASTER_ADDR="$head_node"' in proc.stdout


def test_container_runtimes(tmp_path, small_corpus) -> None:
    pyxis = render(tmp_path, small_corpus, "--nodes", "1", "--gpus-per-node", "2", "--container-image",
                   "ghcr.io/org/moeyard:0.1.0").stdout
    # Mounted at the same paths: the run's folder (holding config, run dir and cache) and the corpus.
    folders = sorted([str(tmp_path), str(small_corpus.parent)])
    binds = ",".join(f"{f}:{f}" for f in folders)
    assert f"--container-image=ghcr.io/org/moeyard:0.1.0 --container-mounts={binds} " in pyxis
    assert f"export MOEYARD_CACHE={tmp_path / 'cache'}" in pyxis and " python -m moeyard train" in pyxis
    apptainer = render(tmp_path, small_corpus, "--nodes", "1", "--gpus-per-node", "2", "--apptainer",
                       "/img/moeyard.sif").stdout
    assert f"apptainer exec --nv --bind {','.join(folders)} /img/moeyard.sif python -m moeyard train" in apptainer


@pytest.mark.parametrize("options,message", [
    (["--nodes", "1", "--gpus-per-node", "2", "--nproc-per-node", "4"], "each worker needs its own GPU"),
    (["--nodes", "1", "--gpus-per-node", "0"], "needs --nproc-per-node"),
    (["--nodes", "3", "--gpus-per-node", "1"], "world size 3 is not a multiple of parallel.ep=2"),
    (["--nodes", "0", "--gpus-per-node", "1"], "--nodes=0 must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "2", "--signal-lead", "5"], "leaves no time to write a checkpoint"),
    (["--nodes", "1", "--gpus-per-node", "2", "--set", "run.dir=/tmp/my run"], "contains white space"),
    (["--nodes", "1", "--gpus-per-node", "2", "--container-image", "a", "--apptainer", "b"], "choose one"),
    (["--nodes", "1", "--gpus-per-node", "2", "--layout", "srun", "--max-restarts", "2"], "needs the torchrun"),
    (["--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "0"], "--cpus-per-task=0 must be >= 1"),
])
def test_bad_slurm_requests_are_refused_with_the_reason(tmp_path, small_corpus, options, message) -> None:
    proc = render(tmp_path, small_corpus, *options)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "#SBATCH" not in proc.stdout


@pytest.mark.parametrize("marker", ["written by this run", "stale", "absent"])
def test_script_requeues_only_after_this_runs_preemption_checkpoint(tmp_path, small_corpus, marker) -> None:
    """A crash makes srun kill the peers with SIGTERM (exit 143 too): without a fresh PREEMPTED marker,
    requeueing would loop on a failing job."""
    script = render(tmp_path, small_corpus, "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2").stdout
    run_dir, fake = tmp_path / "run", tmp_path / "bin"
    fake.mkdir()
    if marker == "stale":
        (run_dir / "PREEMPTED").write_text("{}")
        os.utime(run_dir / "PREEMPTED", (time.time() - 3600, time.time() - 3600))
    write = f"echo '{{}}' > {run_dir}/PREEMPTED" if marker == "written by this run" else ""
    (fake / "srun").write_text(f"#!/bin/bash\n{write}\nexit 143\n")
    (fake / "scontrol").write_text(f'#!/bin/bash\n[ "$1" = show ] && echo localhost || echo "$@" >> {tmp_path}/calls\n')
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "localhost"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("requeue 123\n" if marker == "written by this run" else ""), proc.stdout


@pytest.mark.parametrize("options,message", [
    (["--set", "train.global_batch_tokens=16777216", "--set", "schedule.memory_check=false"],
     "fewer than one global batch"),
    (["--set", "run.dir=/proc/moeyard-run"], "cannot be written"),
])
def test_submit_checks_the_data_and_run_dir_before_the_job_queues(tmp_path, small_corpus, options, message) -> None:
    """What would fail on the compute nodes after the wait in the queue fails at submission (no sbatch)."""
    proc = render(tmp_path, small_corpus, "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                  "--submit", *options)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "job.sbatch").exists()
