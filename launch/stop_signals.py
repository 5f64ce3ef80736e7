"""The launcher's side of stopping a run: signals passed on to the workers, and what the stop saved.

torchrun forwards SIGTERM itself. moeyard passes on SIGUSR1 (Slurm's warning before the time limit) and
takes Ctrl-C from torchrun: the first SIGINT reaches the workers, which save at the next step boundary and
exit; a second one (later than SAME_CTRL_C_S) reaches them too, they stop at once, and torchrun shuts the
job down without a restart.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from moeyard.trainer.run_dir import PREEMPTED, SAME_CTRL_C_S


def _worker_pids() -> list[int]:
    """This process's children that run moeyard.train (Linux /proc)."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"moeyard.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def _forward(signum: int) -> int:
    """Send `signum` to the workers; how many there were. Never raises into torchrun's monitor loop."""
    try:
        pids = _worker_pids()
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        return len(pids)
    except OSError as err:
        print(f"warning: could not forward {signal.Signals(signum).name} to the workers: {err}", file=sys.stderr)
        return 0


def _forward_to_workers(signum: int, frame: Any) -> None:
    _forward(signum)


class _CtrlC:
    """First Ctrl-C: the workers save and stop. Second: they stop at once, and so does torchrun."""

    def __init__(self) -> None:
        self.first = 0.0

    def __call__(self, signum: int, frame: Any) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        now = time.monotonic()
        if self.first and now - self.first <= SAME_CTRL_C_S:
            return  # the same Ctrl-C, seen twice
        workers = _forward(signum)
        if not workers or self.first:  # nothing to save yet, or asked twice: torchrun stops the workers
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
        self.first = now
        print("Ctrl-C: the workers save at the next step boundary and stop; press Ctrl-C again to stop at once "
              "without saving", file=sys.stderr, flush=True)


def take_stop_signals() -> dict[int, Any]:
    """Install the launcher's handlers (before torchrun starts, which then leaves SIGINT alone); returns
    the previous ones for `restore_signals`."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGHUP,SIGQUIT"
    return {signal.SIGUSR1: signal.signal(signal.SIGUSR1, _forward_to_workers),
            signal.SIGINT: signal.signal(signal.SIGINT, _CtrlC())}


def restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def stopped_message(run_dir: Optional[Path], signum: int) -> str:
    """What a stop by `signum` saved, from the workers' PREEMPTED marker and the checkpoints folder."""
    name = signal.Signals(signum).name
    if run_dir is not None and (run_dir / PREEMPTED).exists():
        stopped = json.loads((run_dir / PREEMPTED).read_text())
        return f"stopped by {name}: the workers saved step {stopped['step']}; run the same command to resume"
    latest = run_dir / "checkpoints" / "latest" if run_dir is not None else None
    if latest is not None and latest.is_file():
        return (f"stopped by {name} before the workers could save: the steps after "
                f"{latest.read_text().strip()} were lost; run the same command to resume from it")
    return f"stopped by {name} before the workers could save; no checkpoint exists, the same command starts over"
