"""keep_freed_memory applies on glibc and is off when the user says so (fresh processes: the setting is per
process). Its effect, page faults per layer step, is measured in benchmarks/RESULTS.md: a micro-test of
fault counts depends on where the kernel places the heap and was flaky."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = "from moeyard.launch.malloc_policy import keep_freed_memory; print(keep_freed_memory({}))"


def applied(env_value: str, bounded: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(bounded)], capture_output=True, text=True, timeout=120,
                          env={"MOEYARD_KEEP_FREED_MEMORY": env_value, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings exist in glibc only")
def test_applies_on_glibc_and_can_be_turned_off() -> None:
    assert applied("1") == "True"
    assert applied("1", bounded=True) == "True"  # glibc accepts KEPT_BELOW as its mmap threshold
    assert applied("0") == "False"
