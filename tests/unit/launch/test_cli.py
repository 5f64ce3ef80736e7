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


def test_a_refused_train_costs_no_worker_imports(tmp_path) -> None:
    """The launcher checks a run before any worker starts; what only workers need (DCP, FSDP, DTensor,
    torch's pipelining and torch._dynamo) stays unimported, so a mistake is refused in seconds."""
    worker_only = ("torch.distributed.checkpoint", "torch.distributed.fsdp", "torch.distributed.tensor",
                   "torch.distributed.pipelining", "torch._dynamo")
    code = ("import sys; from moeyard.launch.cli import main; "
            f"rc = main(['train', '--set', 'train.steps=0', '--set', 'run.dir={tmp_path / 'run'}']); "
            f"print([m for m in {worker_only!r} if m in sys.modules], rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[] 2", proc.stdout + proc.stderr
    assert "train.steps" in proc.stderr
