"""Start this node's workers through torch.distributed.run (torchrun), on one node or as one of many.

One node: `--standalone` (torchrun picks a free port). Several nodes: the c10d
rendezvous at `--rdzv-endpoint`, hosted by node 0. The launcher passes SIGUSR1 and
Ctrl-C on to the workers (launch/stop_signals.py) and turns a preemption into exit
code 128 + signal, the code Slurm job scripts and shells expect.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moeyard.errors import BAD_INPUT, NO_SPACE, NONFINITE, PEER_LOST, LaunchError
from moeyard.launch.agent_watchdog import AgentWatchdog
from moeyard.launch.env import available_cpus
from moeyard.launch.peers import NODE_ADDR_ENV
from moeyard.launch.stop_signals import restore_signals, stopped_message, take_stop_signals
from moeyard.trainer.run_dir import PREEMPTED


@dataclass(frozen=True)
class Nodes:
    """Where this node stands among the nodes of a job."""
    count: int = 1
    rank: int = 0
    endpoint: Optional[str] = None
    """host:port of the rendezvous, hosted by node 0; needed when count > 1."""
    run_id: str = "moeyard"
    """Same on every node of one job, different between jobs sharing an endpoint."""
    local_addr: Optional[str] = None
    """The address this node advertises to the others (default: what its hostname resolves to)."""

    def check(self) -> None:
        if self.count < 1:
            raise LaunchError(f"--nnodes={self.count} must be >= 1")
        if not 0 <= self.rank < self.count:
            raise LaunchError(f"--node-rank={self.rank} is outside --nnodes={self.count} (0..{self.count - 1})")
        if self.count > 1:
            if not self.endpoint:
                raise LaunchError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the address of node 0, given "
                                  "alike to every node")
            host, _ = self.host_port()
            if self.local_addr is None and not _loopback_addresses(host):  # a loopback endpoint: one machine
                _refuse_loopback_hostname()

    def host_port(self) -> tuple[str, int]:
        host, _, port = (self.endpoint or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LaunchError(f"--rdzv-endpoint={self.endpoint!r} must be HOST:PORT, e.g. node001:29400")
        return host, int(port)


def _loopback_addresses(name: str) -> set[str]:
    """The addresses `name` resolves to if every one is a loopback address; else (or unresolvable) none."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return set()  # unresolvable: torchrun's own error names it
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    return addresses if addresses and loopback else set()


def _refuse_loopback_hostname() -> None:
    """torchrun advertises this node by its hostname; one that resolves to a loopback address (Debian's
    /etc/hosts maps it to 127.0.1.1) sends the other nodes to themselves, and they wait without an error."""
    name = socket.getfqdn()
    addresses = _loopback_addresses(name)
    if addresses:
        raise LaunchError(f"this node's hostname {name!r} resolves to {', '.join(sorted(addresses))} (loopback), "
                          f"which the other nodes cannot reach, so the job would hang: give --local-addr ADDR "
                          f"(this node's address on the network the nodes share), or map the hostname to that "
                          f"address in /etc/hosts; and set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to that "
                          f"network's interface for the collectives")


def _check_port_free(port: int) -> None:
    """Node 0 hosts the rendezvous store: say so now if its port is taken, not after a confusing timeout."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise LaunchError(f"node 0 cannot host the rendezvous on port {port}: it is in use; choose "
                                  f"another port in --rdzv-endpoint on every node") from None
            raise


def torchrun_argv(nproc: int, nodes: Nodes, max_restarts: int, rendezvous_timeout_s: float,
                  stop_grace_s: float = 300.0) -> list[str]:
    argv = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            f"--shutdown-timeout={int(stop_grace_s)}"]  # how long stopping workers may take to save
    if nodes.count == 1:
        return ["--standalone", *argv]
    conf = f"join_timeout={int(rendezvous_timeout_s)},read_timeout={int(rendezvous_timeout_s)}," \
           f"is_host={str(nodes.rank == 0).lower()}"  # only node 0 hosts: no guessing from host names
    local = [f"--local-addr={nodes.local_addr}"] if nodes.local_addr else []
    return [f"--nnodes={nodes.count}", f"--node-rank={nodes.rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes.endpoint}", f"--rdzv-id={nodes.run_id}", f"--rdzv-conf={conf}", *local, *argv]


def launch_workers(nproc: int, worker_args: list[str], *, nodes: Nodes = Nodes(), max_restarts: int = 0,
                   rendezvous_timeout_s: float = 300.0, run_dir: Optional[Path] = None,
                   stop_grace_s: float = 300.0) -> int:
    """Run `python -m moeyard.train *worker_args` on `nproc` local processes; return the exit code."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    nodes.check()
    if nodes.count > 1 and nodes.rank == 0:
        _check_port_free(nodes.host_port()[1])
    if nodes.local_addr:
        os.environ[NODE_ADDR_ENV] = nodes.local_addr  # the workers name their node by it (launch/peers.py)
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, available_cpus() // nproc))
    argv = [*torchrun_argv(nproc, nodes, max_restarts, rendezvous_timeout_s, stop_grace_s), "-m", "moeyard.train",
            *worker_args]
    handlers = take_stop_signals()
    watchdog = _watchdog(nodes, rendezvous_timeout_s)
    try:
        run(get_args_parser().parse_args(argv))
        if run_dir is not None and (run_dir / PREEMPTED).exists():
            stopped = json.loads((run_dir / PREEMPTED).read_text())
            print(stopped_message(run_dir, stopped["signal"]), file=sys.stderr)
            return 128 + stopped["signal"]
    except ChildFailedError as err:
        failures = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(err.failures.items()))
        print(f"error: training workers failed ({failures}); see their messages above", file=sys.stderr)
        codes = {f.exitcode for f in err.failures.values()}
        agreed = codes in ({BAD_INPUT}, {NONFINITE}, {NO_SPACE}, {PEER_LOST})  # all workers agree on why
        return codes.pop() if agreed else 1
    except SignalException as err:  # the launcher itself was told to stop; workers checkpoint on their way out
        print(stopped_message(run_dir, err.sigval), file=sys.stderr)
        return 128 + err.sigval
    except DistError as err:  # the agent's own calls to node 0's store failed: node 0 is gone or cut off
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: node {nodes.rank}: torchrun lost the rendezvous at {nodes.endpoint} ({first}): node 0 is "
              f"gone or unreachable from here. The last checkpoint is kept: run the same command on every node "
              f"to resume", file=sys.stderr)
        return PEER_LOST
    except RendezvousError as err:
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise LaunchError(f"node {nodes.rank} could not join the rendezvous at {nodes.endpoint} within "
                          f"{rendezvous_timeout_s:.0f} s: {type(err).__name__}: {err}{cause}. Check that node 0 "
                          f"runs with the same --rdzv-endpoint/--rdzv-id and --nnodes, and that the address is "
                          f"reachable from this node (parallel.rendezvous_timeout_s sets the wait)") from None
    finally:
        watchdog.stop()
        restore_signals(handlers)
    return 0


def _watchdog(nodes: Nodes, rendezvous_timeout_s: float) -> AgentWatchdog:
    """Across nodes, torchrun's agent may wait on node 0's store for good once its workers ended."""
    # Between two rounds of workers: a re-rendezvous (join_timeout), then store reads that wait for the
    # other nodes (read_timeout each); all are rendezvous_timeout_s. Longer than that is a hang.
    limit_s = 3 * rendezvous_timeout_s
    watchdog = AgentWatchdog(limit_s, f"node {nodes.rank}: the workers ended {limit_s:.0f} s ago and torchrun "
                                      f"still waits for the rendezvous at {nodes.endpoint} (the other nodes are "
                                      f"gone or unreachable from here), so this node stops. The last checkpoint "
                                      f"is kept: run the same command on every node to resume")
    return watchdog.start() if nodes.count > 1 else watchdog
