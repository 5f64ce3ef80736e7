"""A collective that lost a peer names the other nodes; the launcher's watchdog sees through zombies."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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


def test_a_closed_connection_names_the_peer_gloo_names() -> None:
    peers = Peers(rank=0, nodes=("10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3"))
    err = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                       "[10.0.0.3]:51234")
    closed = peers.lost_peer(err, 600)
    assert closed is not None and "a peer closed its connection" in str(closed)
    assert "lost contact with 10.0.0.3 (rank 3) (its process" in str(closed)  # not every other node


def test_errors_that_are_not_the_transports_are_not_a_lost_peer() -> None:
    from moeyard.errors import CheckpointError

    peers = Peers(rank=0, nodes=("a", "b", "b"))
    assert peers.lost_peer(RuntimeError("CUDA out of memory"), 600) is None
    assert peers.lost_peer(RuntimeError("CUDA error: the launch timed out and was terminated"), 600) is None
    assert peers.lost_peer(RuntimeError("NCCL communicator was aborted on rank 0"), 600) is None
    assert peers.lost_peer(CheckpointError("publishing on rank 0 failed: TimeoutError: Connection timed out"),
                           600) is None
    assert peers.lost_peer(ValueError("gloo/transport timed out"), 600) is None  # only RuntimeErrors


def test_one_node_points_at_its_other_ranks() -> None:
    err = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation")
    lost = Peers(rank=0, nodes=("n", "n")).lost_peer(err, 600)
    assert lost is not None and "lost contact with the other ranks on n (see their errors above)" in str(lost)


def test_an_exited_child_that_nobody_reaped_is_not_running() -> None:
    import os

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while child.pid in child_pids(os.getpid()):
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "Z", "the exited child is not a zombie: the check above proved nothing"
    assert child.poll() == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert sleeper.pid in child_pids(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
