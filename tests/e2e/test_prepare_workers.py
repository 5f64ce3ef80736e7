"""`moeyard prepare --workers` when a process dies (issue 35 item 12): a killed worker is named, with the hint
that it was most likely memory; a SIGKILLed prepare takes its workers with it instead of leaving them blocked."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.tokenizer_cases import train_bpe

pytest.importorskip("tokenizers")


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def _start(tmp_path: Path, out: str) -> tuple[subprocess.Popen, list[int]]:
    """A prepare of ~48 MB of JSONL through a BPE tokenizer with 2 workers, once both workers exist."""
    proc = subprocess.Popen([sys.executable, "-m", "moeyard", "prepare", str(tmp_path / "d.jsonl"), "--out",
                             str(tmp_path / out), "--tokenizer", str(tmp_path / "tok"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(0.5)  # they have batches in hand
    return proc, workers


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepare_kill")
    line = json.dumps({"text": "def f(x):\n    return x + 1  # some code to tokenize\n" * 400}) + "\n"
    (root / "d.jsonl").write_text(line * 2500)
    train_bpe(root / "tok", ["def f(x):\n    return x + 1\n"] * 10)
    return root


def test_a_killed_worker_is_named_and_a_killed_prepare_takes_its_workers_along(source: Path) -> None:
    proc, workers = _start(source, "one")
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "a tokenizer worker died" in err and "fewer --workers" in err and "Traceback" not in err, err

    proc, workers = _start(source, "two")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived the killed prepare"
