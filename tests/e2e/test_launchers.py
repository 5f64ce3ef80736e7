"""The other ways workers start -- mpirun, several nodes, a bare worker under srun/mpirun -- train like a local
run, and a broken launch (busy port, absent master) fails fast with a message instead of hanging."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from helpers.launches import run_nodes
from helpers.multiprocess import free_port
from helpers.runs import cli_in_process, read_metrics, skip_or_fail

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SLURM_RANK = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost"}


def run(cmd: list[str], timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env or ENV)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"`{' '.join(cmd)}` hung for {timeout_s:.0f} s:\n{err.stdout}\n{err.stderr}") from None


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def node_alone(config, tmp_path, rank: int, endpoint: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "moeyard", "train", str(config), "--nnodes", "2", "--node-rank", str(rank),
                "--nproc", "1", "--rdzv-endpoint", endpoint, "--set", f"run.dir={tmp_path / 'run'}",
                "--set", "parallel.rendezvous_timeout_s=5"], timeout_s=120)


def bare_worker(config, tmp_path, rank: int, port: int) -> subprocess.CompletedProcess:
    """A worker as srun starts it, without its peers."""
    env = {**ENV, **SLURM_RANK, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return run([sys.executable, "-m", "moeyard.train", str(config), "--set", f"run.dir={tmp_path / 'run'}",
                "--set", "parallel.rendezvous_timeout_s=3"], timeout_s=120, env=env)


def test_mpirun_trains_like_a_local_run(tmp_path, launch_reference) -> None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        skip_or_fail("mpirun is missing: pip install 'moeyard[mpi]'")
    config, reference = launch_reference
    proc = run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m", "moeyard.train",
                str(config), "--set", f"run.dir={tmp_path / 'run'}"], timeout_s=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert losses(tmp_path / "run") == reference  # same ranks as torchrun gives: bit for bit


def test_two_nodes_on_one_machine_train_like_a_local_run(tmp_path, launch_reference) -> None:
    config, reference = launch_reference
    endpoint = f"127.0.0.1:{free_port()}"
    commands = [[sys.executable, "-m", "moeyard", "train", str(config), "--nnodes", "2", "--node-rank", str(rank),
                 "--nproc", "1", "--rdzv-endpoint", endpoint, "--set", f"run.dir={tmp_path / 'run'}"]
                for rank in (0, 1)]
    outputs = run_nodes(commands, [tmp_path / f"node{rank}.log" for rank in (0, 1)], [ENV, ENV], timeout_s=300)
    assert "node 1 of 2, 1 process(es) (world 2)" in outputs[1]
    # The rendezvous may order the ranks differently from --node-rank; the math is the same up to rounding.
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-5)


def test_node_that_cannot_reach_node_0_fails_with_a_message(tmp_path, launch_reference) -> None:
    started = time.monotonic()
    proc = node_alone(launch_reference[0], tmp_path, 1, f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stderr
    assert "node 1 could not join the rendezvous at 127.0.0.1:" in proc.stderr
    assert time.monotonic() - started < 90


def test_node_0_on_a_busy_port_says_so(tmp_path, launch_reference) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = node_alone(launch_reference[0], tmp_path, 0, f"127.0.0.1:{busy.getsockname()[1]}")
    assert proc.returncode == 2, proc.stderr
    assert "cannot host the rendezvous on port" in proc.stderr and "in use" in proc.stderr


def test_multi_node_flags_are_checked_before_any_worker_starts(tmp_path, launch_reference) -> None:
    config = str(launch_reference[0])
    for flags, message in ((["--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
                           (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "outside --nnodes=2"),
                           (["--nnodes", "2", "--rdzv-endpoint", "h"], "must be HOST:PORT")):
        proc = cli_in_process(["train", config, *flags], tmp_path, {})
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)


def test_worker_that_cannot_reach_the_master_fails_with_a_message(tmp_path, launch_reference) -> None:
    proc = bare_worker(launch_reference[0], tmp_path, 1, free_port())
    assert proc.returncode == 2, proc.stderr
    assert "rank 1 could not reach the master at 127.0.0.1:" in proc.stderr and "within 3 s (slurm" in proc.stderr


def test_rank_0_on_a_busy_master_port_says_so(tmp_path, launch_reference) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = bare_worker(launch_reference[0], tmp_path, 0, busy.getsockname()[1])
    assert proc.returncode == 2, proc.stderr
    assert "rank 0 cannot listen on 127.0.0.1:" in proc.stderr and "Export MASTER_PORT" in proc.stderr
