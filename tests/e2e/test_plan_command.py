"""`moeyard plan --hardware` for a described cluster."""
from __future__ import annotations

import subprocess
import sys

from moeyard import configs


def test_plan_command_for_a_described_cluster() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moeyard", "plan", str(configs.path("tiny.yaml")), "--world-size", "64",
         "--hardware", str(configs.path("hardware/dgx-h100.yaml")), "--set", "parallel.ep=64",
         "--set", "model.moe.num_experts=64", "--set", "train.global_batch_tokens=1048576",
         "--set", "model.dim=1024", "--set", "model.moe.ffn_dim=4096"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hardware description dgx-h100" in proc.stdout and "communication hidden:" in proc.stdout
    assert "predicted speed-up" in proc.stdout
    memory = [line for line in proc.stdout.splitlines() if line.startswith("memory per rank:")]
    assert len(memory) == 1 and memory[0].endswith("fits dgx-h100 (80 GB)"), proc.stdout


def test_plan_says_when_a_model_does_not_fit_and_what_would() -> None:
    """Mixtral-8x7B's shape without sharding beyond ep on 8 H100s: 16 bytes for each of its 7.2B parameters
    per rank (the dense 1.6B and an eighth of the experts) is 116 GB before any activation; the plan says it
    does not fit and that parallel.fsdp would shard the rest."""
    proc = subprocess.run(
        [sys.executable, "-m", "moeyard", "plan", str(configs.path("published/mixtral-8x7b.yaml")),
         "--world-size", "8", "--hardware", "dgx-h100", "--set", "parallel.ep=8", "--set", "parallel.fsdp=false"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "does NOT fit dgx-h100 (80 GB)" in proc.stdout and "parallel.fsdp=true" in proc.stdout, proc.stdout
