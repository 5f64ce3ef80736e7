"""How much memory a rank uses: its model state at start-up, and its peak over each logged interval.

GPU: the allocator's peak (`max_memory_allocated`), reset after each reading. CPU: the
process's peak resident set (VmHWM), reset through /proc/self/clear_refs where Linux
allows it; elsewhere the peak since the process started (getrusage).
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _cpu_peak_bytes() -> int:
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _reset_cpu_peak() -> None:
    try:
        _CLEAR_REFS.write_text("5")  # "reset the peak resident set size"
    except OSError:
        pass  # not Linux, or not allowed: the peak then runs from the process start


def peak_bytes(device: torch.device) -> int:
    """This process's peak since the last reading (or its start), then reset for the next interval."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    peak = _cpu_peak_bytes()
    _reset_cpu_peak()
    return peak


def peak_memory_gb(device: torch.device) -> float:
    """The largest peak over all ranks since the last call, in GB (10^9 bytes). Collective."""
    peak = torch.tensor([float(peak_bytes(device))], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak) / 1e9


def local_bytes(p: Tensor) -> int:
    """What this rank holds of a parameter: its shard when FSDP made it a DTensor."""
    local = p.to_local() if isinstance(p, DTensor) else p
    return local.numel() * local.element_size()


def model_state_line(model: nn.Module, moment_bytes: int = 4) -> str:
    """This rank's parameter bytes, and what gradients and AdamW's two moments (`moment_bytes` each element:
    optim.moment_dtype) add for the trainable ones (a sharded optimizer or FSDP holds only its shard)."""
    params = sum(local_bytes(p) for p in model.parameters())
    trainable = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    moments = 2 * trainable * moment_bytes // 4
    return (f"parameters {params / 2**20:,.1f} MiB, gradients {trainable / 2**20:,.1f} MiB, "
            f"AdamW moments up to {moments / 2**20:,.1f} MiB")
