"""Simulated MoE layer on a described cluster: how much of the all-to-all pipelining hides.

    python benchmarks/simulate_layer.py                       # Mixtral-8x7B-shaped layer, DGX-H100, ep 8 and 64
    python benchmarks/simulate_layer.py --hardware cpu-2core --ep 2 --dim 128 --ffn 256 --tokens 4096

At ep=64 the layer has 64 experts (one per GPU): Mixtral's 8 cannot be spread
over 64 devices. Shapes otherwise are Mixtral's (hidden 4096, expert FFN 14336,
top-2), 8192 tokens per GPU, bf16 on the wire.
"""
from __future__ import annotations

import argparse

from moeyard.models import ModelConfig, MoEConfig
from moeyard.trainer.scheduler.cost_model import moe_layer_timeline, workload_for
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.run_planning import load_hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="dgx-h100")
    parser.add_argument("--ep", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8, help="at least ep")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per device")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    hw = load_hardware(args.hardware)
    costs = HardwareCosts(hw)
    print(f"MoE layer forward + backward on {hw.name}: hidden {args.dim}, expert FFN {args.ffn}, "
          f"top-{args.top_k}, {args.tokens} tokens per device\n")
    print("| ep | experts | r | all-to-all (work) | experts (work) | layer time | exposed comm | comm hidden | "
          "speed-up vs r=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ep in args.ep:
        experts = max(args.experts, ep)
        cfg = ModelConfig(vocab_size=32000, dim=args.dim, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=args.ffn,
                          max_seq_len=4096, moe=MoEConfig(num_experts=experts, top_k=args.top_k, ffn_dim=args.ffn))
        w = workload_for(cfg, tokens=args.tokens, seq_len=4096, ep=ep, dp=ep, micro_steps=1, act_bytes=hw.act_bytes)
        base = None
        for r in args.chunks:
            t = moe_layer_timeline(w, costs, r)
            comm, compute = t.work("comm"), t.work("compute")
            base = base or t.makespan
            hidden = max(0.0, 1 - t.exposed_comm / comm) if comm else 0.0
            print(f"| {ep} | {experts} | {r} | {comm * 1e3:.2f} ms | {compute * 1e3:.2f} ms | {t.makespan * 1e3:.2f} ms"
                  f" | {t.exposed_comm * 1e3:.2f} ms | {hidden:.0%} | {base / t.makespan:.2f}x |")


if __name__ == "__main__":
    main()
