"""Which node each rank runs on, so that a collective that loses a peer says which one.

gloo and NCCL report a cut link or a dead node as a timeout (or a closed connection) deep in a
stack trace, naming neither node nor rank. Each worker learns at start-up where every rank runs
(one all-gather), and `lost_peer` turns such an error into one line naming the other nodes.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from moeyard.errors import MoeyardError, PeerLostError

NODE_ADDR_ENV = "MOEYARD_NODE_ADDR"
"""The address a launcher gave this node (`--local-addr`); else the hostname names it."""

_LOST = ("timed out", "connection closed by peer", "connection reset by peer", "broken pipe",
         "connection refused")
_PEER_ADDRESS = re.compile(r"peer \[([^\]]+)\]")


def node_name() -> str:
    return os.environ.get(NODE_ADDR_ENV) or socket.gethostname()


@dataclass(frozen=True)
class Peers:
    rank: int
    nodes: tuple[str, ...]
    """nodes[r]: where rank r runs."""

    @classmethod
    def gather(cls) -> "Peers":
        """Collective: every rank learns every rank's node."""
        names: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(names, node_name())
        return cls(dist.get_rank(), tuple(str(n) for n in names))

    def others(self, address: Optional[str] = None) -> str:
        """The nodes other than this one with their ranks, e.g. `10.0.0.2 (ranks 2-3)`; only those named
        `address` when it names one (gloo gives the peer of a closed connection)."""
        mine = self.nodes[self.rank]
        by_node: dict[str, list[int]] = {}
        for rank, node in enumerate(self.nodes):
            if node != mine:
                by_node.setdefault(node, []).append(rank)
        if address is not None and address in by_node:
            by_node = {address: by_node[address]}
        if not by_node:
            return f"the other ranks on {mine} (see their errors above)"
        return ", ".join(f"{node} ({_ranks(ranks)})" for node, ranks in by_node.items())

    def lost_peer(self, err: BaseException, timeout_s: float) -> Optional[PeerLostError]:
        """The one-line error for a collective that lost a peer; None for any other error: only the
        transport's own errors count (gloo's carry its source path), never moeyard's or CUDA's."""
        if isinstance(err, MoeyardError) or not isinstance(err, RuntimeError):
            return None
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        transport = "gloo/transport" in text or isinstance(err, dist.DistNetworkError)
        if not transport or not any(pattern in text.lower() for pattern in _LOST):
            return None
        peer = _PEER_ADDRESS.search(text)
        if "timed out" in text.lower():
            what = f"a collective got no answer within parallel.timeout_s={timeout_s:g} s"
            why = ("a node stopped, crashed or lost its network link, or a rank is stuck: raise "
                   "parallel.timeout_s if long pauses are expected")
        else:
            what, why = "a peer closed its connection during a collective", "its process or node ended"
        return PeerLostError(
            f"rank {self.rank} on {self.nodes[self.rank]}: {what}: lost contact with "
            f"{self.others(peer.group(1) if peer else None)} ({why}); the collective said: {text[-200:]}. The last "
            f"checkpoint is kept: once every node is back, run the same command on every node (or requeue "
            f"the job) to resume")


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))
