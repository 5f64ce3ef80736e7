"""One run per run dir: `run_dir/LOCK` names the host and pid of the process that owns the run.

Two launches on one run dir would interleave checkpoints and metrics (each deleting the other's partial
saves). The launcher on node 0 (or, without a moeyard launcher, rank 0) takes the lock before it touches
anything and refreshes it every HEARTBEAT_S; its workers see MOEYARD_RUN_LOCK and do not take it again.
A lock is stale, and taken over, when its holder is gone: a dead pid on this host (or one reused by
another process), no refresh for STALE_S from another host, or an earlier allocation of the same Slurm
job (a requeue).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from moeyard.errors import LaunchError
from moeyard.parallel.agree import from_rank0

LOCK = "LOCK"
HELD_ENV = "MOEYARD_RUN_LOCK"
"""Set for the workers of a launcher that holds the lock."""
HEARTBEAT_S = 10.0
STALE_S = 60.0


def proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (state first); None if `pid` is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (tells a live holder from a reused pid); None if it is gone."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def stale_because(holder: dict[str, Any], age_s: float) -> Optional[str]:
    """Why the lock of `holder`, last refreshed `age_s` ago, is stale; None while its owner may live."""
    me = _me()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return f"it is from an earlier allocation of this Slurm job ({holder['slurm_job']})"
    if holder.get("host") == me["host"]:
        start = _start_time(int(holder.get("pid", -1)))
        if start is None:
            return f"pid {holder.get('pid')} is gone"
        if holder.get("pid_start") and start != holder["pid_start"]:
            return f"pid {holder['pid']} is now another process"
        return None
    if age_s > STALE_S:
        return f"it was last refreshed {age_s:.0f} s ago"
    return None


class RunLock:
    """The lock of one run dir, held from `acquire` to `release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._stop = threading.Event()
        self._mine: Optional[dict[str, Any]] = None

    def _read(self) -> tuple[dict[str, Any], float]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}  # being written, or torn: judged by its age alone
        try:
            return holder, time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return holder, 0.0

    def acquire(self) -> None:
        """Take the lock, or raise LaunchError naming who holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LaunchError(f"run.dir {self.path.parent} cannot be created ({err.strerror}): choose a "
                              f"writable run.dir") from None
        mine = _me()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, age = self._read()
            why = stale_because(holder, age)
            if why is None:
                raise LaunchError(f"run.dir {self.path.parent} is in use by pid {holder.get('pid')} on "
                                  f"{holder.get('host')} (since {holder.get('since')}; lock {self.path}): wait "
                                  f"for that run or choose another run.dir. If it is not running, delete "
                                  f"{self.path}") from None
            print(f"taking over the stale lock {self.path} of pid {holder.get('pid')} on {holder.get('host')}: "
                  f"{why}", flush=True)
            tmp = self.path.with_name(f".{LOCK}.{mine['host']}.{mine['pid']}")
            tmp.write_text(json.dumps(mine))
            os.replace(tmp, self.path)
            time.sleep(0.1)  # two takers of one stale lock: the last rename wins, the other sees it here
            if self._read()[0].get("pid") != mine["pid"]:
                raise LaunchError(f"run.dir {self.path.parent} was just taken by another launch: wait for "
                                  f"it or choose another run.dir") from None
        except OSError as err:
            raise LaunchError(f"run.dir {self.path.parent} is not writable ({err.strerror}): choose a run.dir "
                              f"this user can write, on storage every node shares") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine))
        self._mine = mine
        threading.Thread(target=self._heartbeat, name="moeyard-run-lock", daemon=True).start()
        os.environ[HELD_ENV] = str(self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next beat tries again

    def release(self) -> None:
        """Give the lock up, if it is still this process's."""
        self._stop.set()
        os.environ.pop(HELD_ENV, None)
        holder, _ = self._read()
        if self._mine and holder.get("pid") == self._mine["pid"] and holder.get("host") == self._mine["host"]:
            self.path.unlink(missing_ok=True)
        self._mine = None


def held_by_launcher() -> bool:
    return HELD_ENV in os.environ


def lock_for_workers(run_dir: Path) -> Optional[RunLock]:
    """Without a moeyard launcher holding it (srun or mpirun start the workers), rank 0 takes the lock;
    every rank learns whether it could. Collective; returns rank 0's lock."""
    if held_by_launcher():
        return None
    lock = RunLock(run_dir) if dist.get_rank() == 0 else None
    from_rank0(lambda: lock.acquire(), LaunchError, "locking run.dir", passthrough=True)
    return lock
