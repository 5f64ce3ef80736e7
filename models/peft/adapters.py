"""Low-rank adapters on a frozen linear map: y = W x + (alpha / r) * sum_k g_k B_k A_k x.

lora: one adapter, no router (g = 1): plain LoRA, which folds into W exactly
(`merge_dense_adapters`). lora_moe (MixLoRA, MoLoRA, LoRAMoE): each target gets
E adapters of rank r and a router that sends every token to its top-k of them.
rank1_moe (SMoRA/MoRA): one adapter of rank r whose r ranks are the experts,
top-k routed; that is the same computation with E = r adapters of rank 1. A
routed mixture depends on each token, so it is no fixed matrix and never
merges. B starts at zero, so a fresh adapter leaves the model's function
exactly as it was.

The adapter hangs off its linear map as a child module and a forward hook, put
there from outside by `add_routed_adapters` on a built model (models/build.py), so
the base weights keep their names (`layers.0.attn.wq.weight`) and checkpoints of
the base load unchanged. The adapters are dense parameters (replicated, reduced
over dp); computed for all E at once and masked, which costs E*r columns, a few
percent of the base GEMM at r=8, E=4.

Shape legend (models/__init__.py): N tokens, D in features, O out features, E adapters, R rank of each,
K adapters per token.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from moeyard.errors import ConfigError
from moeyard.models.config import PEFTConfig
from moeyard.models.moe.routers import Router, router_entropy, sequence_balance_loss, top_k_weights


@dataclass(frozen=True)
class AdapterStats:
    """What one routed adapter reports from one forward (the Transformer returns it in ModelOutput)."""

    aux_loss: Tensor
    """Load-balancing loss of its router (1.0 is balanced), with gradient."""
    load_E: Tensor
    """Token copies sent to each adapter (no gradient)."""
    entropy: Tensor
    """Mean entropy of its router's probabilities (no gradient)."""


_RECORD: ContextVar[Optional[dict[str, AdapterStats]]] = ContextVar("adapter_record", default=None)


@contextmanager
def recording_adapters() -> Iterator[dict[str, AdapterStats]]:
    """Collect, by adapter module name, what routed adapters report during the forwards inside the block: they
    run in forward hooks of their linear maps, whose outputs can carry nothing else. Outside such a block (a
    recomputing forward in the backward, evaluation) they report nothing."""
    record: dict[str, AdapterStats] = {}
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


class RoutedLoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: PEFTConfig) -> None:
        super().__init__()
        E, R = cfg.experts_and_rank
        self.top_k, self.scale = cfg.top_k, cfg.alpha / cfg.rank
        self.name = "adapter"
        """Its module name in the model (`<linear map>.adapter`), under which it reports."""
        self.router: Optional[Router] = Router(in_features, E) if cfg.routed else None
        self.A_EDR = nn.Parameter(torch.empty(E, in_features, R))
        self.B_ERO = nn.Parameter(torch.empty(E, R, out_features))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.router is not None:
            nn.init.normal_(self.router.weight_ED, 0.0, 0.02)
        nn.init.normal_(self.A_EDR, 0.0, self.A_EDR.shape[1] ** -0.5)
        nn.init.zeros_(self.B_ERO)  # the model starts as the base model

    def forward(self, x: Tensor) -> Tensor:
        *lead, D = x.shape
        E, _, R = self.A_EDR.shape
        x_ND = x.reshape(-1, D)
        if self.router is None:  # plain LoRA
            return self.scale * ((x_ND @ self.A_EDR[0]) @ self.B_ERO[0]).view(*lead, -1)
        probs_NE = self.router.logits(x_ND).softmax(dim=-1)
        weight_NK, index_NK = top_k_weights(probs_NE, self.top_k, renormalize=self.top_k > 1)
        gate_NE = torch.zeros_like(probs_NE).scatter(1, index_NK, weight_NK).to(x.dtype)
        h_NER = (x_ND @ self.A_EDR.transpose(0, 1).reshape(D, E * R)).view(-1, E, R) * gate_NE.unsqueeze(-1)
        delta_NO = h_NER.reshape(-1, E * R) @ self.B_ERO.reshape(E * R, -1)
        B, S = (lead[0], x_ND.shape[0] // lead[0]) if len(lead) >= 2 else (1, x_ND.shape[0])
        # Computed in every forward, recorded or not: a recomputing (activation-checkpointed) forward must
        # save the same tensors as the first one.
        aux_loss = sequence_balance_loss(probs_NE.view(B, S, E), index_NK.view(B, S, -1))
        record = _RECORD.get()
        if record is not None:
            with torch.no_grad():
                load_E = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(  # bincount syncs on CUDA
                    0, index_NK.flatten(), torch.ones_like(index_NK.flatten()))
                entropy = router_entropy(probs_NE)
            record[self.name] = AdapterStats(aux_loss, load_E, entropy)
        return self.scale * delta_NO.view(*lead, -1)


def with_adapter_losses(aux_loss: Tensor, adapter_stats: dict[str, AdapterStats], coef: float) -> Tensor:
    """`aux_loss` (the MoE layers' weighted balance losses) plus `coef` times each routed adapter's."""
    for stats in adapter_stats.values():
        aux_loss = aux_loss + coef * stats.aux_loss
    return aux_loss


def _add_adapter(module: nn.Linear, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out + module.adapter(args[0])


def add_routed_adapters(model: nn.Module, cfg: PEFTConfig) -> None:
    """Give every nn.Linear whose name matches cfg.targets a RoutedLoRA (as `<name>.adapter`)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in cfg.targets:
        if not any(fnmatchcase(n, pattern) for n in linears):
            examples = ", ".join(list(linears)[:6])
            raise ConfigError(f"model.peft.targets pattern {pattern!r} matches no linear map; they are named like "
                              f"{examples}")
    for name, linear in linears.items():
        if any(fnmatchcase(name, p) for p in cfg.targets):
            linear.adapter = RoutedLoRA(linear.in_features, linear.out_features, cfg)
            linear.adapter.name = f"{name}.adapter"
            linear.adapter.reset_parameters()
            linear.register_forward_hook(_add_adapter)


def routed_adapters(model: nn.Module) -> Iterator[tuple[str, RoutedLoRA]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoRA))


def has_adapter(linear: nn.Module) -> bool:
    """Whether a linear map carries an adapter (which reports through its forward hook, so the map must run
    inside the recorded forward)."""
    return isinstance(getattr(linear, "adapter", None), RoutedLoRA)


ADAPTER_PATTERN = "*.adapter.*"
"""What trains by default when the model has adapters."""


def is_adapter_parameter(name: str) -> bool:
    return fnmatchcase(name, ADAPTER_PATTERN)


@torch.no_grad()
def merge_dense_adapters(model: nn.Module) -> list[str]:
    """Fold every plain LoRA adapter into its linear map (W += scale * (A B)^T); returns the merged names.
    The adapters stay (the caller copies the merged weights into a model without them). Refuses, naming
    them, when any adapter is routed (its mixture changes with each token) or sits on a weight another
    module shares (tied embeddings: merging would change the embedding too)."""
    adapters = dict(routed_adapters(model))
    routed = [n for n, a in adapters.items() if a.router is not None]
    if routed:
        E = adapters[routed[0]].A_EDR.shape[0]
        raise ConfigError(f"{len(routed)} adapters are routed mixtures (e.g. {routed[0]}: {E} adapters, top-"
                          f"{adapters[routed[0]].top_k} per token): the weights they add depend on each token, so "
                          f"no single matrix equals them and they cannot be merged. Use the checkpoint as it is "
                          f"(train --init, sft-eval and prune load adapters), or train model.peft.method=lora "
                          f"to get a mergeable adapter")
    weights = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    for name, adapter in adapters.items():
        linear = model.get_submodule(name.removesuffix(".adapter"))
        if weights.count(id(linear.weight)) > 1:
            raise ConfigError(f"{name} adapts {name.removesuffix('.adapter')}.weight, which is shared with another "
                              f"module (tied embeddings): merging would change both. Keep the adapter unmerged")
    for name, adapter in adapters.items():
        linear = model.get_submodule(name.removesuffix(".adapter"))
        delta_DO = adapter.scale * (adapter.A_EDR[0].double() @ adapter.B_ERO[0].double())
        linear.weight.copy_((linear.weight.double() + delta_DO.t()).to(linear.weight.dtype))
    return list(adapters)
