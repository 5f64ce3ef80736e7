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


def test_the_launcher_checks_a_run_without_worker_imports(tmp_path, small_corpus) -> None:
    """The launcher checks a run (config, memory fit on the meta-device model, corpus, run dir) before any
    worker starts; what only workers need (DCP, FSDP, DTensor, torch's pipelining, torch._dynamo, which
    pulls in the rest) stays unimported: a refusal, or the start of a run, costs ~2 s, not ~4."""
    worker_only = ("torch.distributed.checkpoint", "torch.distributed.fsdp", "torch.distributed.tensor",
                   "torch.distributed.pipelining", "torch._dynamo")
    code = ("import sys; import moeyard.launch.commands.train as t; "
            "t.launch_workers = lambda *a, **k: print('starting workers') or 0; "
            "from moeyard.launch.cli import main; "
            f"rc = main(sys.argv[1:]); print([m for m in {worker_only!r} if m in sys.modules], rc)")
    refused = (["--set", "train.steps=0"], 2, "train.steps=0 must be >= 1")
    started = (["--nproc", "2", "--set", f"data.dir={small_corpus}", "--set", "model.attention=mla", "--set",
                "model.rope_scaling.kind=yarn"], 0, "starting workers")  # MLA and YaRN tables on meta too
    for args, code_wanted, said in (refused, started):
        proc = subprocess.run([sys.executable, "-c", code, "train", "--set", f"run.dir={tmp_path / 'run'}", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip().splitlines()[-1] == f"[] {code_wanted}", proc.stdout + proc.stderr
        assert said in proc.stdout + proc.stderr, proc.stdout + proc.stderr
