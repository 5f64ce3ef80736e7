"""The run directory's markers and the signals that stop a run early.

run.dir holds config.yaml, metrics.jsonl, plan.json, checkpoints/ and two markers:
PREEMPTED (the last launch stopped on a signal after saving; the launcher turns it
into exit code 128 + signal) and STOPPED_NONFINITE (the run stopped on NaN/inf;
restarts refuse to repeat it until the marker is deleted).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.parallel.agree import from_rank0
from moeyard.trainer.config import Config, dump_yaml

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED = "PREEMPTED"
"""Marker in run.dir: the last launch stopped on a signal after saving (JSON: step, signal)."""
STOPPED_NONFINITE = "STOPPED_NONFINITE"
"""Marker in run.dir: the run stopped on NaN/inf; restarts refuse to repeat it until it is deleted."""


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("step_*"))


def _prepare(cfg: Config) -> None:
    run_dir = cfg.run_dir
    if cfg.checkpoint.resume == "none" and holds_a_run(run_dir):
        raise RuntimeError(f"run.dir {run_dir} already holds a run and checkpoint.resume=none: resume it "
                           f"(--resume auto), choose another run.dir, or delete it")
    if (run_dir / STOPPED_NONFINITE).exists():
        stopped = json.loads((run_dir / STOPPED_NONFINITE).read_text())
        raise RuntimeError(f"this run stopped on non-finite values at step {stopped['step']}; repeating it would "
                           f"only stop again. Fix the cause (e.g. lower optim.lr), then delete "
                           f"{run_dir / STOPPED_NONFINITE} to continue")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / PREEMPTED).unlink(missing_ok=True)


def prepare_run_dir(cfg: Config) -> None:
    """Rank 0 checks run.dir may be (re)used, writes the resolved config and clears PREEMPTED; every rank
    learns its verdict. Collective."""
    from_rank0(lambda: _prepare(cfg), RuntimeError, "preparing run.dir", passthrough=True)


def mark_preempted(run_dir: Path, step: int, signum: int) -> None:
    (run_dir / PREEMPTED).write_text(json.dumps({"step": step, "signal": signum}))


def mark_stopped_nonfinite(run_dir: Path, step: int, message: str) -> None:
    (run_dir / STOPPED_NONFINITE).write_text(json.dumps({"step": step, "message": message}))


class Preemption:
    """Remembers SIGTERM/SIGUSR1 from the moment it is made (make it first thing in a worker);
    the ranks agree on it at a step boundary (one tiny all-reduce)."""

    def __init__(self) -> None:
        self.received = 0
        self.previous = {s: signal.signal(s, self._on_signal) for s in PREEMPTION_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> int:
        flag = torch.tensor([self.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
