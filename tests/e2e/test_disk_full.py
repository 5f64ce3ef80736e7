"""A full disk during a checkpoint write: one line, the previous checkpoint intact and `latest`, the
partial folder gone, exit code 4, and the same command resumes once there is space."""
from __future__ import annotations

import subprocess

import pytest
from helpers.runs import moeyard_train, read_metrics, run_moeyard_train, write_config

from moeyard.errors import NO_SPACE
from moeyard.trainer.checkpoint.store import verify


def _mount(target, size_bytes: int, *options: str) -> bool:
    opts = ",".join([*options, f"size={size_bytes}"])
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 6},
                          checkpoint={"every": 1, "keep_last": 2}, log={"tensorboard": False})
    reference = tmp_path / "reference"  # the uninterrupted run, and the size of one checkpoint (all are alike)
    moeyard_train(config, reference, 2, "parallel.ep=2")
    one = sum(f["bytes"] for f in verify(reference / "checkpoints" / "step_000006")["files"])
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount(disk, int(one * 1.6)):  # room for one checkpoint and the metrics, not for two
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        run = disk / "run"
        proc = run_moeyard_train(config, run, 2, "parallel.ep=2")
        err = proc.stderr
        assert proc.returncode == NO_SPACE, err
        assert "Traceback" not in err and "enforce fail" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: no space left")]
        assert lines and f"no space left on the device of {run / 'checkpoints'} writing checkpoint step 2" in lines[0]
        assert f"it needs about {one / 1e9:.2f} GB" in lines[0]
        assert "step_000001 is intact and still `latest`" in lines[0]
        checkpoints = run / "checkpoints"
        assert (checkpoints / "latest").read_text().strip() == "step_000001"
        assert verify(checkpoints / "step_000001")["step"] == 1
        assert not list(checkpoints.glob(".step_*")), "the partial checkpoint was left behind"
        assert not list(run.glob("*.tmp"))
        subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(disk)], check=True)  # space returns
        again = moeyard_train(config, run, 2, "parallel.ep=2")
        assert "at step 1" in again.stdout
        assert [m["step"] for m in read_metrics(run)] == list(range(1, 7))
        assert read_metrics(run)[-1]["loss"] == pytest.approx(read_metrics(reference)[-1]["loss"], rel=1e-6)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

