"""How routing spreads a token over machines, as the cost model needs it."""
from __future__ import annotations

import math


def expected_nodes_per_token(num_experts: int, top_k: int, machines: int, max_nodes: int | None) -> float:
    """Machines a token's top_k experts lie in, expected under uniform routing over `machines` equal
    blocks of experts, each token limited to `max_nodes` of them: k draws without replacement from the
    allowed machines' experts. An estimate: real routers prefer some experts, and node-limited routing
    picks machines for their best experts, so nearly every allowed machine gets one."""
    if machines <= 1:
        return 1.0
    allowed = machines if max_nodes is None else min(max_nodes, machines)
    per, pool = num_experts // machines, allowed * (num_experts // machines)
    if top_k > pool:
        return float(allowed)
    return allowed * (1.0 - math.comb(pool - per, top_k) / math.comb(pool, top_k))
