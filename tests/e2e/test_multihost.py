"""Several hosts: what a launch across nodes checks before it can hang."""
from __future__ import annotations

import os
import subprocess
import sys

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_hostname_that_resolves_to_loopback_is_refused_with_the_fix(tmp_path, launch_reference) -> None:
    """This machine's hostname may map to 127.0.x.1 (Debian's /etc/hosts): without --local-addr node 1
    would dial itself and both nodes would wait. Here the hostname is forced to look so."""
    config, _ = launch_reference
    code = ("import socket, sys; socket.getfqdn = lambda *a: 'localhost'; "
            "from moeyard.launch.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(config), "--nnodes", "2", "--nproc", "1",
                           "--rdzv-endpoint", "10.231.0.1:29400", "--set", f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "resolves to" in proc.stderr and "(loopback)" in proc.stderr and "--local-addr" in proc.stderr
    assert "GLOO_SOCKET_IFNAME" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_two_hosts_train_like_a_local_run(tmp_path, launch_reference) -> None:
    """Two network namespaces with their own addresses and one hostname (one UTS namespace), so each
    host says which address is its own (--local-addr, GLOO_SOCKET_IFNAME)."""
    from helpers.launches import run_nodes
    from helpers.netns import hosts
    from helpers.runs import read_metrics

    config, reference = launch_reference
    with hosts() as (a, b):
        endpoint = f"{a.address}:29400"
        commands = [host.command(sys.executable, "-m", "moeyard", "train", str(config), "--nnodes", "2",
                                 "--node-rank", str(rank), "--nproc", "1", "--rdzv-endpoint", endpoint,
                                 "--local-addr", host.address, "--set", f"run.dir={tmp_path / 'run'}",
                                 "--set", "parallel.timeout_s=60")
                    for rank, host in enumerate((a, b))]
        run_nodes(commands, [tmp_path / f"host{rank}.log" for rank in (0, 1)],
                  [{**ENV, "GLOO_SOCKET_IFNAME": host.interface} for host in (a, b)], timeout_s=240)
    assert [m["loss"] for m in read_metrics(tmp_path / "run")] == reference  # bit for bit
