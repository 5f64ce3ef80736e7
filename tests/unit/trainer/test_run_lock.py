"""One run per run dir: the lock names its holder, and a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moeyard.errors import LaunchError
from moeyard.launch import stop_signals
from moeyard.trainer.run_dir import SAME_CTRL_C_S, Preemption
from moeyard.trainer.run_lock import LOCK, STALE_S, RunLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **holder}))


def test_a_second_lock_on_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    try:
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LaunchError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK).exists()
    RunLock(tmp_path / "run").acquire()  # free again


@pytest.mark.parametrize("holder,age_s,stale", [
    ({"pid": "dead"}, 0, True),  # this host, pid gone
    ({"pid_start": "0"}, 0, True),  # this host, the pid now belongs to another process
    ({}, 0, False),  # this host, alive
    ({"host": "node-elsewhere"}, 0, False),  # another host, refreshed just now
    ({"host": "node-elsewhere"}, STALE_S + 5, True),  # another host, silent too long
    ({"host": "node-elsewhere", "slurm_job": "4242"}, 0, True),  # the same Slurm job, requeued
])
def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path, monkeypatch, holder, age_s, stale):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if holder.get("pid") == "dead":
        holder = {**holder, "pid": _dead_pid()}
    _write_lock(tmp_path, **holder)
    then = time.time() - age_s
    os.utime(tmp_path / LOCK, (then, then))
    lock = RunLock(tmp_path)
    if stale:
        lock.acquire()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    else:
        with pytest.raises(LaunchError, match="is in use by pid"):
            lock.acquire()


def test_a_run_dir_that_cannot_be_written_is_named(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(LaunchError, match="cannot be created"):
        RunLock(blocked / "run").acquire()


def test_a_second_ctrl_c_stops_at_once_and_the_same_one_seen_twice_does_not():
    preemption = Preemption()
    try:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the same Ctrl-C, e.g. forwarded by the launcher
        assert preemption.received == signal.SIGINT
        time.sleep(SAME_CTRL_C_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        preemption.restore()


def test_the_launcher_passes_the_first_ctrl_c_on_and_stops_torchrun_on_the_second(monkeypatch):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    sent = []
    monkeypatch.setattr(stop_signals, "_forward", lambda signum: sent.append(signum) or 2)
    ctrl_c = stop_signals._CtrlC()
    ctrl_c(signal.SIGINT, None)
    ctrl_c(signal.SIGINT, None)  # within SAME_CTRL_C_S: not passed on again
    assert sent == [signal.SIGINT]
    ctrl_c.first -= SAME_CTRL_C_S + 0.1
    with pytest.raises(SignalException):
        ctrl_c(signal.SIGINT, None)
    assert sent == [signal.SIGINT, signal.SIGINT]
    monkeypatch.setattr(stop_signals, "_forward", lambda signum: 0)  # no workers yet: stop at once
    with pytest.raises(SignalException):
        stop_signals._CtrlC()(signal.SIGINT, None)
