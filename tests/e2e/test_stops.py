"""Stopping a run from outside: a second launch on the same run dir, a SIGKILLed launcher, Ctrl-C."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from helpers.launches import finish, kill_tree, logged_steps, start, wait_for, workers
from helpers.runs import moeyard_train, read_metrics, run_moeyard_train, write_config

from moeyard.trainer.checkpoint.store import CheckpointStore, verify
from moeyard.trainer.run_lock import LOCK


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_dir_in_use_refuses_a_second_launch_and_a_sigkilled_launcher_hands_it_to_the_next(tmp_path,
                                                                                             small_corpus):
    """While a run trains, a second launch on its run dir is refused before it touches anything; then its
    launcher is SIGKILLed (as the OOM killer would: no handler runs): its workers save and end, and the
    next launch takes over the stale lock and resumes."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 400})
    run = tmp_path / "run"
    proc = start(config, run, 2)
    try:
        wait_for(lambda: logged_steps(run) >= 2, proc)
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != LOCK}
        second = run_moeyard_train(config, run, 2, "parallel.ep=2", "optim.lr=0.5", timeout_s=120)
        assert second.returncode == 2, second.stderr
        assert f"is in use by pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
        assert (run / "config.yaml").stat().st_mtime_ns == before["config.yaml"], "the refused launch wrote"
        assert proc.poll() is None, "the refused launch disturbed the running one"
        wait_for(lambda: logged_steps(run) >= 3, proc)
        pids = workers(proc)
        assert len(pids) == 2
    except BaseException:
        kill_tree(proc)
        raise
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert not left, f"workers {left} outlived their launcher by 60 s:\n{err}"
    assert "the launcher (pid" in err and "is gone" in err
    newest = CheckpointStore(run / "checkpoints").newest_intact().path
    assert newest is not None and verify(newest)["step"] >= 3, "the orphaned workers did not save"
    step = verify(newest)["step"]
    again = moeyard_train(config, run, 2, "parallel.ep=2", "train.steps=400", f"train.stop_at={step + 1}")
    assert "taking over the stale lock" in again.stdout
    assert f"at step {step}" in again.stdout
    assert [m["step"] for m in read_metrics(run)] == list(range(1, step + 2))


def test_ctrl_c_saves_at_the_next_step_and_says_so(tmp_path, small_corpus):
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 400})
    run = tmp_path / "run"
    proc = start(config, run, 2)
    wait_for(lambda: logged_steps(run) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground group on Ctrl-C
    code, out, err = finish(proc)
    assert code == 128 + signal.SIGINT, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    last = read_metrics(run)[-1]["step"]
    assert f"the workers saved step {last}" in err
    assert verify(CheckpointStore(run / "checkpoints").newest_intact().path)["step"] == last
    assert not (run / LOCK).exists(), "the launcher did not release the run dir"
