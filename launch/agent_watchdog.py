"""Ends a node's launcher that torchrun's agent keeps alive after its workers ended.

After its workers stop, the agent talks to node 0's rendezvous store (to restart them, to close the
rendezvous, at the exit barrier). When node 0 is gone or its link is cut, those calls can block for
good, deep in C++ where no signal reaches them: the node would sit there while the job is over.
This thread watches the launcher's child processes; once it had workers and then none for longer
than any legitimate wait (a re-rendezvous, bounded by parallel.rendezvous_timeout_s, plus a store
call), it says so and ends the process.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from moeyard.errors import PEER_LOST
from moeyard.trainer.run_lock import proc_stat


def child_pids(pid: int) -> set[int]:
    """The running child processes of `pid` (all its threads'), from /proc; exited ones that nobody
    reaped yet (zombies: the agent that would reap them is the one that hangs) do not count."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue  # the thread ended meanwhile
    return {child for child in children if _running(child)}


def _running(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


class AgentWatchdog:
    def __init__(self, limit_s: float, message: str, poll_s: float = 1.0) -> None:
        self.limit_s, self.message, self.poll_s = limit_s, message, poll_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "AgentWatchdog":
        if Path(f"/proc/{os.getpid()}/task").is_dir():  # Linux; elsewhere no watchdog
            self._thread = threading.Thread(target=self._watch, name="moeyard-agent-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        had_workers, idle_since = False, None
        while not self._stop.wait(self.poll_s):
            if child_pids(os.getpid()):
                had_workers, idle_since = True, None
                continue
            if not had_workers:
                continue  # still joining the first rendezvous: torchrun's own timeout covers that
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > self.limit_s and not self._stop.is_set():
                print(f"error: {self.message}", file=sys.stderr, flush=True)
                os._exit(PEER_LOST)
