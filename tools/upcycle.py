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
from moeyard.models import MoEConfig, build_model
from moeyard.tools.hf_config import DENSE_FAMILIES, family_of, model_config_from_hf, read_hf_config
from moeyard.tools.hf_weights import HFTensors, check_embedding, check_hf_tensors, moeyard_producers
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.data.tokenizer import hf_tokenizer_record


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


def upcycled_tensor(part: str, dense_weight: Tensor, experts: int, granularity: int) -> Tensor:
    """One MoE tensor (moeyard layout) of `part` (w_gate_EDF, w_up_EDF or w_down_EFD) from its dense SwiGLU
    matrix in nn.Linear layout ([F, D] for gate and up, [D, F] for down): expert e is slice e % G."""
    G = granularity
    if part == "w_down_EFD":
        slices = (dense_weight.t() * G).chunk(G, dim=0)  # G x [F/G, D]
    else:
        slices = dense_weight.t().chunk(G, dim=1)  # G x [D, F/G]
    return torch.stack([slices[e % G] for e in range(experts)])


DENSE_OF = {"w_gate_EDF": "w_gate", "w_up_EDF": "w_up", "w_down_EFD": "w_down"}


def upcycle(hf_dir: Path, out: Path, experts: int, top_k: int, granularity: int = 1, seed: int = 0) -> Path:
    """A dense HF model as an MoE whose every expert is (a slice of) the MLP, written one tensor at a time
    after a dry run over the files' headers has checked every name and shape."""
    hf = read_hf_config(hf_dir)
    family = family_of(hf, DENSE_FAMILIES)
    moe = upcycled_config(hf, experts, top_k, granularity)
    moe_cfg = model_config_from_hf(hf, family, moe)
    dry = HFTensors(hf_dir, dry=True)
    check_embedding(dry, moe_cfg, hf_dir)
    dense = moeyard_producers(dry, moe_cfg, family, dense=True)
    check_hf_tensors(dry, dense, moe_cfg, family)
    generator = torch.Generator().manual_seed(seed)
    router_rows = [torch.randn(experts // granularity, moe_cfg.dim, generator=generator) * moe_cfg.init_std
                   for _ in range(moe_cfg.n_layers)]
    src = HFTensors(hf_dir)

    def produce(name: str) -> Tensor:
        if ".ffn." not in name:
            return dense[name](src)
        _, layer, _, kind, part = name.split(".")  # layers.{i}.ffn.{experts|router}.{part}
        if kind == "router":
            return router_rows[int(layer)].repeat_interleave(granularity, dim=0)
        return upcycled_tensor(part, dense[f"layers.{layer}.ffn.{DENSE_OF[part]}.weight"](src), experts, granularity)

    with torch.device("meta"):
        shapes = {n: p for n, p in build_model(moe_cfg).named_parameters()}
    source = {"format": "huggingface", "family": family, "dir": str(hf_dir.resolve()),
              "upcycled": {"experts": experts, "top_k": top_k, "granularity": granularity, "seed": seed}}
    tokenizer = hf_tokenizer_record(hf_dir)
    if tokenizer is not None:  # as import_hf: a corpus for this model must be prepared with it
        source["tokenizer"] = tokenizer
    return write_weights_checkpoint(shapes, moe_cfg, out, source, produce=produce)
