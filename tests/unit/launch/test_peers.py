"""A collective that lost a peer names the other nodes; the launcher's watchdog sees through zombies."""
from __future__ import annotations

import subprocess
import sys
import time

from moeyard.errors import PEER_LOST
from moeyard.launch.agent_watchdog import child_pids
from moeyard.launch.peers import Peers


def test_a_timeout_names_the_other_nodes_and_their_ranks() -> None:
    peers = Peers(rank=1, nodes=("10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.1"))
    err = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation")
    lost = peers.lost_peer(err, 20)
    assert lost is not None and lost.exit_code == PEER_LOST
    assert str(lost).startswith("rank 1 on 10.0.0.2: a collective got no answer within parallel.timeout_s=20 s: "
                                "lost contact with 10.0.0.1 (ranks 0,4), 10.0.0.3 (rank 3)")


def test_a_closed_connection_is_a_lost_peer_and_other_errors_are_not() -> None:
    peers = Peers(rank=0, nodes=("a", "b", "b"))
    closed = peers.lost_peer(RuntimeError("Connection closed by peer [10.0.0.2]:51234"), 600)
    assert closed is not None and "a peer closed its connection" in str(closed) and "b (ranks 1-2)" in str(closed)
    assert peers.lost_peer(RuntimeError("CUDA out of memory"), 600) is None
    assert peers.lost_peer(ValueError("timed out"), 600) is None  # only the collectives' RuntimeErrors


def test_one_node_names_its_own_other_ranks() -> None:
    assert Peers(rank=0, nodes=("n", "n")).others() == "the other ranks on n"


def test_an_exited_child_that_nobody_reaped_is_not_running() -> None:
    import os

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while child.pid in child_pids(os.getpid()):  # a zombie until waited for
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    assert child.poll() == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert sleeper.pid in child_pids(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
