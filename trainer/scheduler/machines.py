"""How routing spreads a token over machines, as the cost model needs it."""
from __future__ import annotations

import math
from typing import Optional

from moeyard.models import MoEConfig


def machine_bound(moe: MoEConfig, machines: int, max_nodes: Optional[int]) -> Optional[int]:
    """The most machines a token's experts may lie on: `max_nodes` (node-limited routing), and sigmoid_bias's
    topk_groups where every machine holds whole groups (DeepSeek-V3's 8 groups, top 4, on 8 machines)."""
    bounds = [] if max_nodes is None else [max_nodes]
    groups = moe.sigmoid_bias
    if moe.router == "sigmoid_bias" and groups.n_groups > 1 and groups.n_groups % machines == 0:
        bounds.append(groups.topk_groups)
    return min(bounds) if bounds else None


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
