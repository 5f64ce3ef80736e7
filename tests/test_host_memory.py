"""keep_freed_memory makes a repeated step reuse its pages (in a fresh process: the setting is per process)."""
from __future__ import annotations

import subprocess
import sys

STEP = """
import resource, sys, torch
from moeyard.launch.host_memory import keep_freed_memory
assert keep_freed_memory() is (sys.argv[1] == "1")
def step():  # 32 + 16 + 16 MiB allocated and freed, like a layer's permuted rows and buffers
    a = torch.ones(8 * 2**20); b = torch.ones(4 * 2**20); return float((a[: b.numel()] + b)[0])
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""
PAGES_PER_STEP = 64 * 2**20 // 4096


def faults_per_step(keep: bool) -> int:
    env = {"MOEYARD_KEEP_FREED_MEMORY": "1" if keep else "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", STEP, "1" if keep else "0"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip())


def test_steady_state_step_reuses_its_pages() -> None:
    kept, default = faults_per_step(keep=True), faults_per_step(keep=False)
    assert kept < PAGES_PER_STEP // 4, (kept, default)  # glibc's default faults in most of the 16k pages
    assert 4 * kept < default, (kept, default)
