"""Task-specific expert pruning: keep each MoE layer's experts a calibration set actually uses.

Routing is recorded on calibration batches (how often each expert is picked and
the routing weight it receives); each layer keeps the `keep` experts with the
most weight (frequency breaks ties), in their original order. The kept experts'
weights and their router rows are copied into a model with `keep` experts per
layer (or an uneven budget, `--keep-per-layer`, recorded as model.moe.num_experts_per_layer) and written as
a weights-only checkpoint: `--init` trains or tunes it at
any world size and ep, `sft-eval` evaluates it. With renormalised top-k
routing, a token whose chosen experts all survive is computed exactly as
before (its weights are ratios of the same probabilities), so keeping every
expert reproduces the model exactly; the held-out loss before and after says
what pruning cost.

Shape legend (models/__init__.py): N tokens, K experts per token, E experts, D.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moeyard.errors import CheckpointError, ConfigError
from moeyard.models import ModelConfig, Transformer, build_model
from moeyard.models.moe.routers import Routing
from moeyard.trainer.checkpoint.sharded import fill_model, load_full_model
from moeyard.trainer.checkpoint.store import verify
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.config.sections import build_config
from moeyard.trainer.data.blend import TokenBatches
from moeyard.trainer.data.compat import check_tokenizers, checkpoint_tokenizer
from moeyard.trainer.data.tokens import ensure_corpus, read_meta
from moeyard.trainer.losses import lm_loss_sum

PRUNABLE_ROUTERS = ("topk_softmax", "switch")


@torch.no_grad()
def expert_usage(model: Transformer, batches: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """Per MoE layer: (times each expert was picked, routing weight it received) over the batches."""
    usage: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for layer, moe in model.moe_layers():
        E = moe.cfg.num_experts
        usage[layer] = (torch.zeros(E, dtype=torch.int64), torch.zeros(E, dtype=torch.float64))

        def record(_module: Any, _args: Any, routing: Routing, layer: int = layer) -> None:
            picks, weight = usage[layer]
            picks += torch.bincount(routing.expert_index_NK.flatten(), minlength=picks.numel())
            weight.index_add_(0, routing.expert_index_NK.flatten(), routing.weight.flatten().double())
        hooks.append(moe.router.register_forward_hook(record))
    try:
        for batch in batches:
            model(batch[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    return usage


def experts_to_keep(usage: dict[int, tuple[Tensor, Tensor]], keep: dict[int, int]) -> dict[int, Tensor]:
    """Per layer, the ids of its `keep[layer]` experts with the most routing weight, ascending."""
    kept = {}
    for layer, (picks, weight) in usage.items():
        score = weight + picks.double() * 1e-12  # frequency only breaks ties
        kept[layer] = score.topk(keep[layer]).indices.sort().values
    return kept


def keep_per_layer(cfg: ModelConfig, keep: int | list[int]) -> dict[int, int]:
    """{MoE layer: experts to keep}, after checking each budget against the layer's experts and top_k."""
    layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    counts = [keep] * len(layers) if isinstance(keep, int) else list(keep)
    if len(counts) != len(layers):
        raise ConfigError(f"--keep-per-layer has {len(counts)} counts for the {len(layers)} MoE layers {layers}: "
                          f"give one count per MoE layer, in order")
    for layer, count in zip(layers, counts):
        have = cfg.moe_for_layer(layer).num_experts
        if not cfg.moe.top_k <= count <= have:
            raise ConfigError(f"keeping {count} experts in MoE layer {layer}: it must be between "
                              f"model.moe.top_k={cfg.moe.top_k} and the layer's {have} experts")
    return dict(zip(layers, counts))


PER_EXPERT = ("experts.w_gate_EDF", "experts.w_up_EDF", "experts.w_down_EFD", "experts.b_gate_EF", "experts.b_up_EF",
              "experts.b_down_ED", "router.weight_ED", "router.bias_E")
"""A MoE layer's tensors with one row per expert (the biases where the model has them)."""


def pruned_state(state: dict[str, Tensor], kept: dict[int, Tensor]) -> dict[str, Tensor]:
    """The expert weights and router rows of the kept experts; everything else unchanged."""
    out = dict(state)
    for layer, ids in kept.items():
        prefix = f"layers.{layer}.ffn."
        for name in PER_EXPERT:
            if prefix + name in state:
                out[prefix + name] = state[prefix + name].index_select(0, ids).clone()
    return out


@torch.no_grad()
def mean_loss(model: Transformer, batches: list[Tensor]) -> float:
    """The mean over batches of each batch's mean next-token loss (the training step's own loss)."""
    losses = [lm_loss_sum(model(b[:, :-1]).logits_BTV, b[:, 1:], None) / b[:, 1:].numel() for b in batches]
    return float(torch.stack(losses).mean())


def prune(ckpt: Path, data: str, keep: int | list[int], out: Path, calibration_batches: int = 8,
          heldout_batches: int = 4) -> dict[str, Any]:
    """Prune the checkpoint to `keep` experts per MoE layer (one count for all, or one per layer); returns
    what was kept and the held-out losses."""
    try:
        manifest = verify(ckpt)
    except CheckpointError as err:
        raise ConfigError(f"moeyard prune: {err}") from None
    cfg = build_config(manifest["config"])
    moe = cfg.model.moe
    if moe.router not in PRUNABLE_ROUTERS:
        raise ConfigError(f"moeyard prune handles token-choice softmax routers ({', '.join(PRUNABLE_ROUTERS)}); "
                          f"this model uses model.moe.router={moe.router}")
    if cfg.model.mtp_layers:
        raise ConfigError(f"moeyard prune does not prune the {cfg.model.mtp_layers} MTP depths' experts yet "
                          f"(model.mtp_layers): prune a model without them")
    budget = keep_per_layer(cfg.model, keep)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new folder for the pruned checkpoint")
    data_dir = Path(data) if (Path(data) / "meta.json").is_file() else ensure_corpus(data, None, cfg.data.glob)
    check_tokenizers(cfg, {"calibration": read_meta(data_dir)}, [("the checkpoint to prune", manifest)])
    seq_len = cfg.train.seq_len
    windows = TokenBatches(data_dir, seq_len, 8, 0, 1, seed=cfg.run.seed)
    batches = [windows.batch(i).tokens_BT1 for i in range(calibration_batches + heldout_batches)]
    calibration, heldout = batches[:calibration_batches], batches[calibration_batches:]

    model = build_model(cfg.model).eval()
    load_full_model(ckpt, model)
    kept = experts_to_keep(expert_usage(model, calibration), budget)
    state = pruned_state({n: p.detach() for n, p in model.named_parameters()}, kept)
    counts = list(budget.values())
    uneven = counts if len(set(counts)) > 1 else None
    pruned_cfg = dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, num_experts=max(counts),
                                                                        num_experts_per_layer=uneven))
    pruned = build_model(pruned_cfg).eval()
    fill_model(pruned, state, {})
    report = {"kept_experts": {str(k): v.tolist() for k, v in kept.items()},
              "heldout_loss_before": mean_loss(model, heldout), "heldout_loss_after": mean_loss(pruned, heldout),
              "heldout_tokens": sum(b[:, 1:].numel() for b in heldout)}
    source = {"family": "moeyard (pruned)", "dir": str(ckpt), "pruned": report}
    tokenizer = checkpoint_tokenizer(manifest)
    if tokenizer is not None:  # the pruned model still needs the corpus tokenizer its source was trained with
        source["tokenizer"] = tokenizer
    write_weights_checkpoint(state, pruned_cfg, out, source=source)
    return report
