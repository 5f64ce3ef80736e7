"""Real processes killed and signalled mid-run: nothing finished is lost, restarts resume."""
from __future__ import annotations

import os
import signal

import pytest
from helpers.launches import finish, logged_steps, start, wait_for, workers
from helpers.runs import moeyard_train, read_metrics, write_config

from moeyard.trainer.checkpoint.store import CheckpointStore, verify


@pytest.mark.parametrize("signum,restarts", [(signal.SIGTERM, 0), (signal.SIGUSR1, 2)])
def test_preemption_signal_saves_then_exits_and_the_same_command_resumes(tmp_path, small_corpus, signum,
                                                                         restarts) -> None:
    """SIGTERM (torchrun forwards it) or SIGUSR1 (Slurm's warning; moeyard forwards it) to the launcher.
    With restarts allowed, a preemption must still stop the job, not restart it. (A SIGKILLed worker that
    --max-restarts does restart: benchmarks/soak.py's smoke in test_benchmarks.py, three times.)"""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 400})
    run = tmp_path / "run"
    proc = start(config, run, 2, restarts=restarts)
    wait_for(lambda: logged_steps(run) >= 3, proc)
    proc.send_signal(signum)
    code, out, err = finish(proc)
    assert code == 128 + signum, err
    assert "resumed from" not in out, "a preempted job was restarted"
    steps = [m["step"] for m in read_metrics(run)]
    assert 3 <= steps[-1] < 400
    newest = CheckpointStore(run / "checkpoints").newest_intact().path
    assert newest is not None and verify(newest)["step"] == steps[-1], "the stop lost steps"
    proc = moeyard_train(config, run, 2, "parallel.ep=2", "train.steps=400", f"train.stop_at={steps[-1] + 2}")
    assert f"at step {steps[-1]}" in proc.stdout
    assert [m["step"] for m in read_metrics(run)] == list(range(1, steps[-1] + 3))


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, small_corpus) -> None:
    """A bigger model so that writing takes a while; a worker is SIGKILLed while a .tmp folder exists."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 200}, checkpoint={"every": 1})
    run = tmp_path / "run"
    big = ["model.dim=256", "model.moe.ffn_dim=1024", "model.ffn_dim=1024", "checkpoint.keep_last=2"]
    proc = start(config, run, 2, *big)
    checkpoints = run / "checkpoints"
    wait_for(lambda: (checkpoints / "step_000002").is_dir() and any(checkpoints.glob(".step_*.tmp")), proc,
             poll_s=0.002)
    for pid in workers(proc):
        os.kill(pid, signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code != 0
    assert any(checkpoints.glob(".step_*.tmp")), "the kill did not land during a write"
    store = CheckpointStore(checkpoints)
    newest = store.newest_intact()
    assert newest.path is not None and newest.skipped == ()
    latest = (checkpoints / "latest").read_text().strip()
    assert (checkpoints / latest).is_dir() and verify(checkpoints / latest)["step"] == verify(newest.path)["step"]
    step = verify(newest.path)["step"]
    proc2 = moeyard_train(config, run, 2, "parallel.ep=2", *big, f"train.stop_at={step + 1}")
    assert f"at step {step}" in proc2.stdout
    assert not list(checkpoints.glob(".step_*.tmp")), "the half-written checkpoint was not cleaned up"
