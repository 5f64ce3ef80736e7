"""Keep freed host memory mapped, so a CPU training step reuses pages instead of faulting in fresh ones.

glibc hands blocks over 128 KiB-32 MiB straight to mmap and unmaps them on free,
and trims the heap top when it frees. An MoE step allocates and frees the same
large tensors every step (permuted rows, all-to-all buffers, expert activations
and gradients), so every step paid one page fault and one zeroed page per 4 KiB
of them: tens of thousands of faults and ~10% of a CPU layer's time, all of it
outside the GEMMs (measured with benchmarks/moe_layer.py). Serving large blocks
from the heap and never trimming it makes the second step reuse the first
step's pages. The cost: the process keeps its peak heap, as a caching allocator
would. Set MOEYARD_KEEP_FREED_MEMORY=0 to leave glibc's defaults alone.

Under fsdp the largest transient tensors are gathered units, of a different size each, which a kept heap
would hold on to (and fragment around): there only blocks below `KEPT_BELOW` stay mapped, larger ones go
to mmap and back to the system when freed, so a run that shards its state to fit also peaks lower.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
KEPT_BELOW = 32 * 2**20
"""glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""


def keep_freed_memory(bounded: bool = False) -> bool:
    """Applies to this process; True when glibc accepted the settings (False elsewhere, or when disabled).
    `bounded` (fsdp): keep freed blocks below KEPT_BELOW only."""
    if os.environ.get("MOEYARD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    large = mallopt(_M_MMAP_THRESHOLD, KEPT_BELOW) if bounded else mallopt(_M_MMAP_MAX, 0)
    return bool(large) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def available_bytes() -> int | None:
    """The host's MemAvailable (what can be allocated without swapping), or None where /proc says nothing."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
