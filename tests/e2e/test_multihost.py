"""Several hosts, for real on one machine (network namespaces with their own addresses): what a launch
across nodes checks before it can hang, training across them, and a node lost mid-run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_hostname_that_resolves_to_loopback_is_refused_with_the_fix(tmp_path, launch_reference,
                                                                      monkeypatch) -> None:
    """This machine's hostname may map to 127.0.x.1 (Debian's /etc/hosts): without --local-addr node 1
    would dial itself and both nodes would wait. Here the hostname is forced to look so."""
    import socket

    from helpers.runs import cli_in_process

    config, _ = launch_reference
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "localhost")
    proc = cli_in_process(["train", str(config), "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint",
                           "10.231.0.1:29400", "--set", f"run.dir={tmp_path / 'run'}"], tmp_path, {})
    assert proc.returncode == 2, proc.stderr
    assert "resolves to" in proc.stderr and "(loopback)" in proc.stderr and "--local-addr" in proc.stderr
    assert "GLOO_SOCKET_IFNAME" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def checkpointed_reference(tmp_path_factory, small_corpus):
    """(config, losses) of a 20-step run of 2 pipeline stages (pp=2, 1f1b, 2 micro-batches) on one host,
    checkpointed every 5 steps: what a run across two hosts (a stage on each: activations and their gradients
    cross the hosts' link) that lost a node or a worker must end at. ep across hosts: the mpirun test."""
    from helpers.runs import moeyard_train, read_metrics, write_config

    root = tmp_path_factory.mktemp("checkpointed_reference")
    config = write_config(root / "c.yaml", small_corpus, parallel={"pp": 2}, train={"steps": 20, "micro_batch_size": 8},
                          checkpoint={"every": 5})
    moeyard_train(config, root / "run", 2)
    return config, [m["loss"] for m in read_metrics(root / "run")]


def _node_commands(config, run_dir, pair, *options: str) -> list[list[str]]:
    """Two network namespaces with their own addresses and one hostname (one UTS namespace), so each host
    says which address is its own (--local-addr, GLOO_SOCKET_IFNAME)."""
    endpoint = f"{pair[0].address}:29400"
    return [host.command(sys.executable, "-m", "moeyard", "train", str(config), "--nnodes", "2", "--node-rank",
                         str(rank), "--nproc", "1", "--rdzv-endpoint", endpoint, "--local-addr", host.address,
                         "--set", f"run.dir={run_dir}", *options)
            for rank, host in enumerate(pair)]


def test_a_cut_link_stops_every_node_naming_the_other(tmp_path, small_corpus) -> None:
    """veth down mid-run: each worker's collective times out after parallel.timeout_s and names the node it
    lost; node 1's launcher, whose agent then waits on node 0's store for good, is ended by its watchdog."""
    import time

    from helpers.launches import logged_steps
    from helpers.netns import hosts, set_link
    from helpers.runs import write_config

    timeout_s, rendezvous_s = 8, 6  # node 1's watchdog waits 3 x rendezvous_s after its worker ends
    config = write_config(tmp_path / "c.yaml", small_corpus, parallel={"ep": 2}, train={"steps": 5000},
                          checkpoint={"every": 10})
    run_dir, logs = tmp_path / "run", [tmp_path / "host0.log", tmp_path / "host1.log"]
    with hosts() as pair:
        commands = _node_commands(config, run_dir, pair, "--set", f"parallel.timeout_s={timeout_s}",
                                  "--set", f"parallel.rendezvous_timeout_s={rendezvous_s}")
        nodes = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**ENV, "GLOO_SOCKET_IFNAME": host.interface})
                 for cmd, log, host in zip(commands, logs, pair)]
        try:
            deadline = time.monotonic() + 180
            latest = run_dir / "checkpoints" / "latest"
            while not (latest.exists() and logged_steps(run_dir) >= 15):
                assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
                    "\n".join(log.read_text() for log in logs)
                time.sleep(0.1)
            kept = latest.read_text().strip()
            set_link(pair[0], up=False)
            cut = time.monotonic()
            ended = []
            for node in nodes:
                node.wait(timeout=3 * rendezvous_s + timeout_s + 60)
                ended.append(time.monotonic() - cut)
        finally:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, 9)
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [5, 5], "\n".join(outputs)  # PEER_LOST
    for rank, (out, other) in enumerate(zip(outputs, reversed(pair))):
        assert f"error: rank {rank} on {pair[rank].address}: a collective got no answer within " \
               f"parallel.timeout_s={timeout_s} s: lost contact with {other.address} (rank {1 - rank})" in out, out
        assert "Traceback" not in out, out
    assert ended[0] < timeout_s + 15, ended  # node 0 hosts the store: its launcher ends with its worker
    assert "node 1: the workers ended" in outputs[1] and ended[1] < timeout_s + 3 * rendezvous_s + 15, ended
    assert latest.read_text().strip() == kept and (run_dir / "checkpoints" / kept / "manifest.json").exists()


def test_a_killed_node_is_requeued_and_the_run_ends_at_the_uninterrupted_loss(tmp_path,
                                                                              checkpointed_reference) -> None:
    """Two hosts train like one, a pipeline stage on each (bit for bit, as the end shows); then every process
    of node 1 is SIGKILLed mid-run: node 0's worker loses its peer at once and stops with the peer's name; both
    nodes started again (a requeue) resume from the last checkpoint and end like a run never interrupted."""
    import signal
    import time

    from helpers.launches import logged_steps, run_nodes
    from helpers.netns import hosts
    from helpers.runs import read_metrics

    config, reference = checkpointed_reference
    run_dir = tmp_path / "run"
    with hosts() as pair:
        commands = _node_commands(config, run_dir, pair, "--set", "parallel.timeout_s=30")
        envs = [{**ENV, "GLOO_SOCKET_IFNAME": host.interface} for host in pair]
        logs = [tmp_path / "first0.log", tmp_path / "first1.log"]
        nodes = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
                 for cmd, log, env in zip(commands, logs, envs)]
        try:
            deadline = time.monotonic() + 180
            while not ((run_dir / "checkpoints" / "latest").exists() and logged_steps(run_dir) >= 8):
                assert time.monotonic() < deadline and nodes[0].poll() is None, logs[0].read_text()
                time.sleep(0.05)
            for pid in subprocess.run(["ip", "netns", "pids", pair[1].namespace], capture_output=True, text=True,
                                      timeout=30).stdout.split():
                os.kill(int(pid), signal.SIGKILL)  # the node dies: its launcher and its workers
            nodes[0].wait(timeout=60)
        finally:
            for node in nodes:
                node.kill()
        first = logs[0].read_text()
        assert nodes[0].returncode == 5 and f"lost contact with {pair[1].address} (rank 1)" in first, first
        run_nodes(commands, [tmp_path / "again0.log", tmp_path / "again1.log"], envs, timeout_s=240)
    again = (tmp_path / "again0.log").read_text()
    assert "resumed from" in again, again
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert [m["loss"] for m in steps] == reference  # bit for bit


AGENT = """#!/bin/sh
# mpirun's ssh stand-in: `agent [options] HOST COMMAND` runs COMMAND on HOST, a network namespace
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case $host in node0) ns=%s; hosts=%s ;; node1) ns=%s; hosts=%s ;; *) echo "unknown host $host" >&2; exit 255 ;; esac
exec nsenter --net=/run/netns/$ns unshare --mount --uts sh -c "mount --bind $hosts /etc/hosts && hostname $host && $*"
"""


def test_mpirun_across_two_hosts_trains_like_a_local_run(tmp_path, launch_reference) -> None:
    """Open MPI starts its daemon on the second host through an ssh stand-in; rank 0's address reaches the
    workers through MPI itself (no MASTER_ADDR), over the hosts' own network."""
    import shutil

    from helpers.netns import as_host, hosts, hosts_file, name_hosts
    from helpers.runs import read_metrics, skip_or_fail

    mpirun = shutil.which("mpirun")
    if mpirun is None:
        skip_or_fail("mpirun is missing: pip install 'moeyard[mpi]'")
    config, reference = launch_reference
    with hosts() as pair:
        name_hosts(pair)
        agent = tmp_path / "agent"
        agent.write_text(AGENT % (pair[0].namespace, hosts_file(pair[0]), pair[1].namespace, hosts_file(pair[1])))
        agent.chmod(0o755)
        subnet = pair[0].address.rsplit(".", 1)[0] + ".0/24"
        cmd = as_host(pair, 0, mpirun, "--allow-run-as-root", "--host", "node0:1,node1:1", "-n", "2",
                      "--prtemca", "plm_ssh_agent", str(agent), "--prtemca", "oob_tcp_if_include", subnet,
                      "--mca", "btl_tcp_if_include", subnet, "-x", "OMP_NUM_THREADS",
                      sys.executable, "-m", "moeyard.train", str(config), "--set", f"run.dir={tmp_path / 'run'}",
                      "--set", "parallel.timeout_s=60")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"mpirun across two hosts hung:\n{err.stdout}\n{err.stderr}") from None
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == reference  # bit for bit


def test_a_restart_across_hosts_is_not_cut_short_by_the_watchdog(tmp_path, checkpointed_reference) -> None:
    """--max-restarts with one host's worker SIGKILLed: both agents stay, re-rendezvous and restart their
    workers from the last checkpoint; the watchdog (3 x rendezvous_timeout_s without workers) lets them."""
    import signal
    import time

    from helpers.launches import logged_steps
    from helpers.netns import hosts
    from helpers.runs import read_metrics

    config, reference = checkpointed_reference
    run_dir, logs = tmp_path / "run", [tmp_path / "host0.log", tmp_path / "host1.log"]
    with hosts() as pair:
        commands = _node_commands(config, run_dir, pair, "--max-restarts", "1", "--set", "parallel.timeout_s=30",
                                  "--set", "parallel.rendezvous_timeout_s=10")
        nodes = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  env={**ENV, "GLOO_SOCKET_IFNAME": host.interface})
                 for cmd, log, host in zip(commands, logs, pair)]
        try:
            deadline = time.monotonic() + 180
            while not ((run_dir / "checkpoints" / "latest").exists() and logged_steps(run_dir) >= 8):
                assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), logs[0].read_text()
                time.sleep(0.05)
            pids = subprocess.run(["ip", "netns", "pids", pair[1].namespace], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            worker = next(int(p) for p in pids if b"moeyard.train" in Path(f"/proc/{p}/cmdline").read_bytes())
            os.kill(worker, signal.SIGKILL)
            for node in nodes:
                node.wait(timeout=240)
        finally:
            for node in nodes:
                node.kill()
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "resumed from" in outputs[0] + outputs[1] and "the workers ended" not in outputs[0] + outputs[1]
    steps = read_metrics(run_dir)
    assert [m["step"] for m in steps] == list(range(1, 21))
    # After a re-rendezvous the nodes may take the ranks in the other order: equal up to rounding.
    assert [m["loss"] for m in steps] == pytest.approx(reference, rel=1e-5)
