"""A `moeyard train` launch in the background, as a user's terminal or a scheduler holds it: start it,
wait for what it writes, signal it, end it, and find its workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start(config: Path, run_dir: Path, nproc: int, *overrides: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moeyard", "train", str(config), "--nproc", str(nproc), "--max-restarts",
           str(restarts), "--set", f"run.dir={run_dir}", "--set", f"parallel.ep={nproc}",
           "--set", "parallel.timeout_s=60"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEYARD_CACHE": str(run_dir.parent / "cache")}
    # Own session: on a timeout the whole tree (launcher and workers) is killed, and no orphaned worker
    # keeps the output pipes open.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 180, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            out, err = kill_tree(proc)
            raise AssertionError(f"the run ended ({proc.returncode}) before the condition held:\n{out}\n{err}")
        if time.monotonic() > deadline:
            out, err = kill_tree(proc)
            raise AssertionError(f"condition not reached in {timeout_s} s:\n{out}\n{err}")
        time.sleep(poll_s)


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out, err = kill_tree(proc)
        raise AssertionError(f"the run did not end within {timeout_s} s:\n{out}\n{err}") from None
    return proc.returncode, out, err


def workers(proc: subprocess.Popen) -> list[int]:
    """PIDs of the training workers: the launcher's child processes running moeyard.train."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"moeyard.train" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_nodes(commands: list[list[str]], logs: list[Path], envs: list[dict], timeout_s: float) -> list[str]:
    """Start one `moeyard train` per node and wait for all; their outputs, after checking that every one
    exited 0. Output goes to files, not pipes: a full pipe would block a node."""
    nodes = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
             for cmd, log, env in zip(commands, logs, envs)]
    try:
        for node in nodes:
            node.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError("multi-node training hung:\n" + "\n".join(log.read_text() for log in logs)) from None
    finally:
        for node in nodes:
            node.kill()
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0] * len(nodes), "\n".join(outputs)
    return outputs
