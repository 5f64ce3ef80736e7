"""A checkpoint crafted to run code is refused by every command that reads one, and no code runs.

The folder is a real checkpoint whose `.metadata` is a pickle that would `touch` a marker file, with a
manifest listing its true size and sha256 (tests/helpers/untrusted.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES
from helpers.untrusted import malicious_checkpoint

FIXTURE = FIXTURES / "checkpoint_before_restructure"


def _moeyard(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moeyard", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [f"run.dir={run_dir}", f"data.dir={FIXTURE / 'corpus'}", "parallel.timeout_s=60", *overrides]
    return _moeyard("train", str(FIXTURE / "config.yaml"), "--nproc", "2", *[a for s in sets for a in ("--set", s)])


@pytest.mark.parametrize("command", ["inspect", "export", "init", "resume"])
def test_a_crafted_metadata_pickle_never_runs(tmp_path, command):
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    if command == "resume":
        ckpt = malicious_checkpoint(run_dir / "checkpoints" / "step_000002", marker)
        (run_dir / "checkpoints" / "latest").write_text("step_000002")
    else:
        ckpt = malicious_checkpoint(tmp_path / "downloaded" / "step_000002", marker)
    if command == "inspect":
        proc = _moeyard("checkpoint", "inspect", str(ckpt))
    elif command == "export":
        proc = _moeyard("checkpoint", "export", str(ckpt), "--to", str(tmp_path / "out"))
    elif command == "init":
        proc = _train(run_dir, f"checkpoint.init={ckpt}")
    else:
        proc = _train(run_dir)
    output = proc.stdout + proc.stderr
    assert not marker.exists(), f"the payload ran during {command}"
    assert proc.returncode == 2, output
    assert f"{ckpt / '.metadata'} asks to construct posix.system" in output
    assert "Traceback" not in output
    if command == "export":
        assert not (tmp_path / "out").exists()
