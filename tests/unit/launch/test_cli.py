"""The `moeyard` command line: each subcommand imports only its own module."""
from __future__ import annotations

import json
import subprocess
import sys


def test_prepare_runs_without_importing_torch(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    code = ("import sys; from moeyard.launch.cli import main; "
            f"rc = main(['prepare', {str(tmp_path / 'd.jsonl')!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "print('torch' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-2:] == ["False", "0"], proc.stdout + proc.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["tokens"] == 6


def test_help_still_lists_every_subcommand() -> None:
    proc = subprocess.run([sys.executable, "-m", "moeyard", "--help"], capture_output=True, text=True, timeout=120)
    for name in ("train", "sft", "slurm", "plan", "checkpoint", "prepare", "convert", "sft-eval", "prune"):
        assert name in proc.stdout
