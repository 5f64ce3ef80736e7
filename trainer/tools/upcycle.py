"""Sparse upcycling: a dense Llama/Mistral/Qwen2/Qwen3 checkpoint becomes an MoE that starts where it was.

Every MLP becomes E experts. Granularity 1: each expert is a copy of the MLP; the top-k weights sum to one
(renormalised), so the layer's output is the MLP's whatever the router picks. Granularity G: the MLP's
hidden units are cut into G slices and expert e = c*G + s is slice s (of copy group c), with its down
projection scaled by G. The router starts with one random row per copy group, repeated for the G experts
of the group: their scores tie exactly, so top-k (a multiple of G) takes whole groups, every slice once
per group, and the renormalised weights again add up to the MLP's output.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moeyard.errors import ConfigError
from moeyard.models import MoEConfig
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.tools.hf_config import DENSE_FAMILIES, family_of, model_config_from_hf, read_hf_config
from moeyard.trainer.tools.hf_weights import HFTensors, hf_to_moeyard


def upcycled_config(hf: dict, experts: int, top_k: int, granularity: int) -> MoEConfig:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(granularity >= 1, f"--granularity={granularity} must be >= 1")
    need(top_k >= 2, f"--top-k={top_k}: upcycling needs top-k >= 2, whose renormalised weights sum to one "
                     f"(a top-1 router weights its expert by its probability, so the MoE would not start equal)")
    need(experts % granularity == 0, f"--experts={experts} must be a multiple of --granularity={granularity}")
    need(top_k % granularity == 0 and 1 <= top_k <= experts,
         f"--top-k={top_k} must be a multiple of --granularity={granularity} and at most --experts={experts}: "
         f"each token needs every slice of the MLP")
    need(hf["intermediate_size"] % granularity == 0,
         f"--granularity={granularity} does not divide the MLP's intermediate_size={hf['intermediate_size']}")
    return MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=hf["intermediate_size"] // granularity,
                     renormalize=True, first_dense_layers=0, every=1)


def upcycle_mlp(gate_FD: Tensor, up_FD: Tensor, down_DF: Tensor, experts: int, granularity: int,
                router_rows: Tensor) -> dict[str, Tensor]:
    """The MoE tensors (moeyard layout) for one dense SwiGLU given in HF layout ([F, D] and [D, F])."""
    G = granularity
    slices_gate = gate_FD.t().chunk(G, dim=1)  # G x [D, F/G]
    slices_up = up_FD.t().chunk(G, dim=1)
    slices_down = (down_DF.t() * G).chunk(G, dim=0)  # G x [F/G, D]
    pick = [e % G for e in range(experts)]
    return {
        "experts.w_gate_EDF": torch.stack([slices_gate[s] for s in pick]),
        "experts.w_up_EDF": torch.stack([slices_up[s] for s in pick]),
        "experts.w_down_EFD": torch.stack([slices_down[s] for s in pick]),
        "router.weight_ED": router_rows.repeat_interleave(G, dim=0),
    }


def upcycle(hf_dir: Path, out: Path, experts: int, top_k: int, granularity: int = 1, seed: int = 0) -> Path:
    hf = read_hf_config(hf_dir)
    family = family_of(hf, DENSE_FAMILIES)
    moe = upcycled_config(hf, experts, top_k, granularity)
    moe_cfg = model_config_from_hf(hf, family, moe)
    dense = hf_to_moeyard(HFTensors(hf_dir), moe_cfg, family, dense=True)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.items() if ".ffn." not in k}
    for i in range(moe_cfg.n_layers):
        rows = torch.randn(experts // granularity, moe_cfg.dim, generator=generator) * moe_cfg.init_std
        mlp = [dense[f"layers.{i}.ffn.{w}.weight"] for w in ("w_gate", "w_up", "w_down")]  # nn.Linear layout
        moe_tensors = upcycle_mlp(*mlp, experts, granularity, rows)
        state.update({f"layers.{i}.ffn.{k}": v for k, v in moe_tensors.items()})
    source = {"format": "huggingface", "family": family, "dir": str(hf_dir.resolve()),
              "upcycled": {"experts": experts, "top_k": top_k, "granularity": granularity, "seed": seed}}
    return write_weights_checkpoint(state, moe_cfg, out, source)
