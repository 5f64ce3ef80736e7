"""Simulated MoE layer on DGX-H100 clusters: flat vs hierarchical dispatch, with and without node-limited routing.

    python benchmarks/simulate_hierarchical.py            # prints the markdown table for benchmarks/RESULTS.md

Predicted with the cost model and simulator (trainer/scheduler), configs/hardware/dgx-h100.yaml, nothing
ran on a GPU. One MoE layer forward + backward, 4,096 tokens per GPU, bf16 on the wire, the best pipeline
degree r in {1, 2, 4, 8} for each dispatch; the ep group spans min(nodes, E/8) machines (one expert per GPU
at least: Mixtral's 8 experts are widened to one per GPU, as simulate_layer.py does). Machines per token
are the uniform-routing expectation (cost_model.expected_nodes_per_token), not measured routing.
"""
from __future__ import annotations

import dataclasses

from moeyard.models import ModelConfig, MoEConfig
from moeyard.trainer.scheduler.cost_model import moe_layer_timeline, workload_for
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.machines import expected_nodes_per_token
from moeyard.trainer.scheduler.run_planning import load_hardware

SHAPES = {  # name: (hidden, expert FFN, experts, top-k)
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "Qwen3-235B": (4096, 1536, 128, 8),
    "DeepSeek-V3": (7168, 2048, 256, 8),
}
NODES = (2, 4, 8, 16, 32, 64)
TOKENS = 4096
DEEPEP_GBPS = "43-47"


def best_layer(w, costs, dispatch: str) -> tuple[float, int, object]:
    """(layer seconds, r, timeline) with the fastest pipeline degree."""
    best = None
    for r in (1, 2, 4, 8):
        t = moe_layer_timeline(w, costs, r, dispatch)
        if best is None or t.makespan < best[0]:
            best = (t.makespan, r, t)
    return best


def main() -> None:
    hw = load_hardware("dgx-h100")
    costs = HardwareCosts(hw)
    G = hw.devices_per_node
    print("| shape | nodes | ep machines | M | dispatch | r | MB off-machine per GPU (dispatch) | cross-machine "
          "dispatch | effective GB/s per GPU | layer fwd+bwd | exposed comm | vs flat, M none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (dim, ffn, experts, k) in SHAPES.items():
        for nodes in NODES:
            ep = min(nodes * G, max(experts, nodes * G) if name.startswith("Mixtral") else experts)
            E = max(experts, ep)
            cfg = ModelConfig(vocab_size=32000, dim=dim, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=ffn,
                              max_seq_len=4096, moe=MoEConfig(num_experts=E, top_k=k, ffn_dim=ffn))
            base = workload_for(cfg, tokens=TOKENS, seq_len=4096, ep=ep, dp=nodes * G, micro_steps=1,
                                act_bytes=hw.act_bytes, ranks_per_node=G)
            flat_none = None
            for bound in (None, 4):
                if bound is not None and bound >= base.ep_nodes:
                    continue
                w = dataclasses.replace(base, nodes_per_token=expected_nodes_per_token(E, k, base.ep_nodes, bound))
                for dispatch in ("flat", "hierarchical"):
                    if dispatch == "flat" and bound is not None:
                        continue  # flat sends a row per copy: the bound changes no byte
                    seconds, r, t = best_layer(w, costs, dispatch)
                    flat_none = flat_none or seconds
                    cross_bytes = w.cross_node_bytes(dispatch)
                    if dispatch == "flat":
                        cross_s = costs.all_to_all(w, w.a2a_bytes)
                    else:
                        cross_s = costs.staged_all_to_all(w, cross_bytes, "cross")
                    # Bytes of every copy bound off the machine, over the time the network stage takes.
                    effective = w.cross_node_bytes("flat") / cross_s / 1e9
                    print(f"| {name} | {nodes} | {w.ep_nodes} | {bound or 'none'} | {dispatch} | {r} | "
                          f"{cross_bytes / 1e6:.1f} | {cross_s * 1e3:.2f} ms | {effective:.0f} | "
                          f"{seconds * 1e3:.2f} ms | {t.exposed_comm * 1e3:.2f} ms | {flat_none / seconds:.2f}x |")
    print(f"\nDeepEP (published, H800 + CX7 RDMA): {DEEPEP_GBPS} GB/s per GPU internode dispatch/combine.")


if __name__ == "__main__":
    main()
