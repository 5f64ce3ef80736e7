"""Peak memory of packed-document attention at T=8192 on CPU: the boolean [B, 1, T, T] mask through SDPA
(what moeyard did before), on CPU's own kernel and on the math kernel that a GPU falls back to for a
boolean mask with GQA (it materialises [B, H, T, T] scores), vs moeyard's document_attention
(per-document causal SDPA here, varlen flash attention on a GPU). Forward and backward
of one attention call, each variant in its own process, peak RSS above the inputs.

    python benchmarks/attention_memory.py            # T=8192, 8 documents, H=8 (K=2), Q=64
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeyard.models.document_attention import DocumentSpans, document_attention


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, T: int, docs: int, H: int, K: int, Q: int) -> dict:
    torch.manual_seed(0)
    segment = torch.arange(T).div(T // docs, rounding_mode="floor").view(1, T)
    q, k, v = (torch.randn(1, n, T, Q, requires_grad=True) for n in (H, K, K))
    spans = DocumentSpans.from_segments(segment)
    before = _peak_mib()
    if variant.startswith("bool_mask"):
        mask = torch.ones(T, T, dtype=torch.bool).tril() & (segment[:, :, None] == segment[:, None, :])
        backends = [SDPBackend.MATH] if variant == "bool_mask_math" else [SDPBackend.FLASH_ATTENTION,
                                                                          SDPBackend.MATH]
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=True)
    else:
        out = document_attention(q, k, v, spans)
    out.square().sum().backward()
    return {"variant": variant, "peak_mib_above_inputs": round(_peak_mib() - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.seq, args.docs, args.heads, args.kv_heads, args.head_dim)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *shape)))
        return
    rows = []
    for variant in ("bool_mask", "bool_mask_math", "document_attention"):
        cmd = [sys.executable, __file__, "--variant", variant, "--seq", str(args.seq), "--docs", str(args.docs),
               "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                              timeout=600).stdout.splitlines()[-1]))
    ours = max(rows[-1]["peak_mib_above_inputs"], 0.1)
    print(f"T={args.seq}, {args.docs} documents, H={args.heads}, K={args.kv_heads}, Q={args.head_dim}, fwd+bwd")
    for row in rows:
        print(f"  {row['variant']:<20} peak {row['peak_mib_above_inputs']:>9.1f} MiB above the inputs")
    for row in rows[:-1]:
        print(f"  {row['variant']} / document_attention: {row['peak_mib_above_inputs'] / ours:.1f}x")


if __name__ == "__main__":
    main()
