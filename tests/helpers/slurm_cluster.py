"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd as child processes of the test run.

Everything lives in one temporary folder (config, key, state, logs, sockets) on free ports, so it
neither needs nor touches a system Slurm. `.ci/run` installs Debian's slurm-wlm and munge; on a
machine without them the Slurm tests skip, unless MOEYARD_REQUIRE_LAUNCHERS=1 (CI) makes that a failure.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from helpers.multiprocess import free_port
from helpers.netns import NAMES, as_host, name_hosts
from helpers.runs import skip_or_fail

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


class SlurmCluster:
    """One node (`localhost`) by default; with `hosts` (helpers.netns), one slurmd per network namespace,
    each in its own UTS namespace named nodeN, and slurmctld beside the first. Commands then run inside
    the first host (`self.prefix`), the only place that reaches slurmctld."""

    def __init__(self, root: Path, hosts: Sequence = ()) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.hosts = tuple(hosts)
        self.names = list(NAMES[:len(self.hosts)]) or ["localhost"]
        self.prefix: list[str] = self.hosts[0].command() if self.hosts else []

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
        if missing:
            skip_or_fail(f"Slurm/munge is not installed ({', '.join(missing)} missing): "
                         f"apt-get install -y slurm-wlm munge")
        if os.geteuid() != 0:
            skip_or_fail("slurmd must run as root to start job steps")
        for sub in ("state", *(f"spool/{name}" for name in self.names)):
            (self.root / sub).mkdir(parents=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", "--foreground", "--force", f"--socket={self.root / 'munge.sock'}",
                    f"--key-file={key}", f"--log-file={self.root / 'munged.log'}",
                    f"--pid-file={self.root / 'munged.pid'}", f"--seed-file={self.root / 'munged.seed'}")
        self._wait_for(lambda: (self.root / "munge.sock").exists(), "munged to create its socket")
        self.conf.write_text(self._config(free_port(), free_port()))
        if not self.hosts:
            self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
            self._spawn("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        else:
            name_hosts(self.hosts)
            self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf), inside=0)
            for i in range(len(self.hosts)):
                self._spawn("slurmd", "-D", "-f", str(self.conf), inside=i, log=f"slurmd-{self.names[i]}.out")
        self._wait_for(self._node_idle, "the Slurm nodes to become idle")
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator["SlurmCluster"]:
        """Started for the block, with workers on one thread each and a cache of their own; stopped after."""
        try:
            self.start()
            self.env.update(OMP_NUM_THREADS="1", MOEYARD_CACHE=str(self.root / "cache"))
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if not self.procs:
            return  # never started (skipped): nothing to stop
        subprocess.run([*self.prefix, "scancel", "--full", "--user", getpass.getuser()], env=self.env,
                       capture_output=True, timeout=30)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _spawn(self, daemon: str, *args: str, inside: Optional[int] = None, log: str = "") -> None:
        """Start `daemon`; `inside`: in that host's network namespace, under its own hostname."""
        exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        cmd = [exe, *args]
        if inside is not None:
            cmd = as_host(self.hosts, inside, *cmd)
        out = open(self.root / (log or f"{daemon}.out"), "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env))

    def _wait_for(self, ready, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n"
                                         f"{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.logs()}")

    def _node_idle(self) -> bool:
        out = subprocess.run([*self.prefix, "sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split() == ["idle"] * len(self.names)

    def _config(self, ctld_port: int, slurmd_port: int) -> str:
        user, r = getpass.getuser(), self.root
        ctld = f"{self.names[0]}({self.hosts[0].address})" if self.hosts else \
            f"{os.uname().nodename.split('.')[0]}(127.0.0.1)"
        addresses = [h.address for h in self.hosts] or ["127.0.0.1"]
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=4 State=UNKNOWN" for n, a in zip(self.names, addresses))
        return f"""\
ClusterName=moeyardtest
SlurmctldHost={ctld}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock,cred_expire=5
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    # --- jobs ---------------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout_s: float = 60) -> str:
        proc = subprocess.run([*self.prefix, *cmd], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        assert proc.returncode == 0, f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr}"
        return proc.stdout

    def job_field(self, job_id: str, key: str) -> Optional[str]:
        out = self.run("scontrol", "show", "job", job_id)
        for token in out.split():
            if token.startswith(f"{key}="):
                return token.split("=", 1)[1]
        return None

    def wait_until_done(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job left the queue for good (requeued runs included); return its final state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        self.run("scancel", job_id)
        raise AssertionError(f"Slurm job {job_id} still {state} after {timeout_s:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            name = path.name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)
