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
