"""The run directory's markers and the signals that stop a run early.

run.dir holds config.yaml, metrics.jsonl, plan.json, checkpoints/ and two markers:
PREEMPTED (the last launch stopped on a signal after saving; the launcher turns it
into exit code 128 + signal) and STOPPED_NONFINITE (the run stopped on NaN/inf;
restarts refuse to repeat it until the marker is deleted).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.errors import LaunchError
from moeyard.parallel.agree import from_rank0
from moeyard.trainer.config.sections import Config, dump_yaml

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_CTRL_C_S = 1.0
"""A SIGINT this soon after the first is the same Ctrl-C (the terminal signals every process of the
group, and the launcher forwards its own); a later one is a second Ctrl-C."""
PREEMPTED = "PREEMPTED"
"""Marker in run.dir: the last launch stopped on a signal after saving (JSON: step, signal)."""
STOPPED_NONFINITE = "STOPPED_NONFINITE"
"""Marker in run.dir: the run stopped on NaN/inf; restarts refuse to repeat it until it is deleted."""


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("step_*"))


def _prepare(cfg: Config) -> None:
    run_dir = cfg.run_dir
    if cfg.checkpoint.resume == "none" and holds_a_run(run_dir):
        raise LaunchError(f"run.dir {run_dir} already holds a run and checkpoint.resume=none: resume it "
                           f"(--resume auto), choose another run.dir, or delete it")
    if (run_dir / STOPPED_NONFINITE).exists():
        stopped = json.loads((run_dir / STOPPED_NONFINITE).read_text())
        raise LaunchError(f"this run stopped on non-finite values at step {stopped['step']}; repeating it would "
                           f"only stop again. Fix the cause (e.g. lower optim.lr), then delete "
                           f"{run_dir / STOPPED_NONFINITE} to continue")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / PREEMPTED).unlink(missing_ok=True)


def prepare_run_dir(cfg: Config) -> None:
    """Rank 0 checks run.dir may be (re)used, writes the resolved config and clears PREEMPTED; every rank
    learns its verdict. Collective."""
    from_rank0(lambda: _prepare(cfg), LaunchError, "preparing run.dir", passthrough=True)


def mark_preempted(run_dir: Path, step: int, signum: int) -> None:
    (run_dir / PREEMPTED).write_text(json.dumps({"step": step, "signal": signum}))


def mark_stopped_nonfinite(run_dir: Path, step: int, message: str) -> None:
    (run_dir / STOPPED_NONFINITE).write_text(json.dumps({"step": step, "message": message}))


class Preemption:
    """Remembers SIGTERM/SIGUSR1/SIGINT from the moment it is made (make it first thing in a worker);
    the ranks agree on it at a step boundary (one tiny all-reduce), save and stop. A second Ctrl-C
    stops at once (KeyboardInterrupt); so does a worker whose launcher is gone and that does not finish
    its save within the grace period."""

    def __init__(self) -> None:
        self.received = 0
        self.first_sigint = 0.0
        self.previous = {s: signal.signal(s, self._on_signal) for s in PREEMPTION_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint and now - self.first_sigint > SAME_CTRL_C_S:
                raise KeyboardInterrupt
            self.first_sigint = self.first_sigint or now
        self.received = self.received or signum

    def watch_parent(self, grace_s: float, poll_s: float = 0.5) -> None:
        """Stop like on SIGTERM when the process that started this one dies (a launcher SIGKILLed or
        OOM-killed leaves its workers to init): save at the next step boundary, or exit after `grace_s`."""
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(poll_s)
            print(f"warning: the launcher (pid {parent}) is gone: saving at the next step boundary and "
                  f"stopping (at the latest in {grace_s:.0f} s)", file=sys.stderr, flush=True)
            self.received = self.received or signal.SIGTERM
            time.sleep(grace_s)
            print("error: the save after the launcher died did not finish in checkpoint.stop_grace_s; "
                  "stopping without it", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)

        threading.Thread(target=watch, name="moeyard-parent-watch", daemon=True).start()

    def agreed(self, device: torch.device) -> int:
        flag = torch.tensor([self.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
