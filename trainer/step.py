"""One optimizer step: micro-batches forward/backward, gradient reduction, clip, AdamW.

Loss scaling makes every layout train the same model: a rank's language-model
loss is its token-loss *sum* times dp / (global tokens), so averaging gradients
over dp yields the gradient of the global batch's mean loss. Router losses are
already means; they are divided by the number of micro-steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moeyard.models import Transformer
from moeyard.parallel import ParallelMesh
from moeyard.parallel.grad_sync import GradSync


@dataclass(frozen=True)
class StepResult:
    loss: float
    """lm_loss + aux_loss + z_loss of the global batch."""
    lm_loss: float
    aux_loss: float
    """Weighted load-balancing loss, summed over MoE layers."""
    z_loss: float
    """Weighted router z-loss, summed over MoE layers."""
    grad_norm: float
    """Before clipping."""
    tokens: int
    """Tokens in the global batch."""
    expert_load: dict[int, list[int]]
    """Per MoE layer: token copies routed to each expert over the global batch."""
    dropped_fraction: dict[int, float]
    """Per MoE layer: fraction of routed copies dropped for capacity."""
    unrouted_fraction: dict[int, float]
    """Per MoE layer: fraction of tokens that reached no routed expert (expert_choice, or capacity drops)."""
    router: dict[int, dict[str, float | list[float]]]
    """Per MoE layer: unweighted aux and z loss and router entropy of the global batch, plus the router's
    own state as this step's forward used it (e.g. sigmoid_bias's expert biases)."""
    skipped: bool = False
    """The loss or a gradient was NaN/inf: parameters and optimizer state were left unchanged."""


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: Transformer, sync: GradSync, batch_BT1: Tensor, *, micro_batch_size: int,
               pmesh: ParallelMesh, lr: float, grad_clip: float, dtype: torch.dtype) -> StepResult:
    """`batch_BT1` is this rank's share of the global batch: [sequences, seq_len + 1] token ids."""
    device = next(model.parameters()).device
    batch_BT1 = batch_BT1.to(device, non_blocking=True)
    micro_batches = batch_BT1.split(micro_batch_size)
    global_tokens = batch_BT1.shape[0] * (batch_BT1.shape[1] - 1) * pmesh.dp
    lm_scale = pmesh.dp / global_tokens

    sync.zero_grad()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # lm sum, aux, z  (this rank)
    counts: dict[int, Tensor] = {}  # per MoE layer: copies routed to each expert, dropped, unrouted (global)
    layer_sums: dict[int, Tensor] = {}  # aux, z, entropy per MoE layer (this rank, summed over micro-steps)
    for i, micro in enumerate(micro_batches):
        sync.begin_micro_step(last=i == len(micro_batches) - 1)  # earlier micro-steps only accumulate
        inputs_BT, targets_BT = micro[:, :-1], micro[:, 1:]
        with autocast_context(device, dtype):
            out = model(inputs_BT)
        lm_sum = F.cross_entropy(out.logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="sum")
        router_loss = (out.aux_loss + out.z_loss) / len(micro_batches)
        (lm_sum * lm_scale + router_loss).backward()
        sums += torch.stack([lm_sum.detach(), out.aux_loss.detach(), out.z_loss.detach()]).double()
        for layer, stats in out.moe_stats.items():
            counted = torch.cat([stats.tokens_per_expert_E, stats.dropped.view(1), stats.unrouted.view(1)])
            counts[layer] = counts.get(layer, 0) + counted
            per_layer = torch.stack([stats.aux_loss.detach(), stats.z_loss.detach(), stats.entropy]).double()
            layer_sums[layer] = layer_sums.get(layer, 0) + per_layer

    grad_norm = sync.reduce()  # waits for (or runs) the gradient reduction
    layers = sorted(counts)
    sums = torch.cat([sums, *(layer_sums[layer] for layer in layers)])
    dist.all_reduce(sums, group=pmesh.dp_group)  # global losses: the same on every rank, like the norm
    finite = bool(torch.isfinite(sums[:3]).all()) and bool(torch.isfinite(grad_norm))
    # Router state as this step's forward used it (before the update below).
    router_state = {layer: moe.router.extra_metrics() for layer, moe in model.moe_layers()}
    if finite:  # every rank takes the same decision from the same numbers
        sync.apply(lr, grad_clip, grad_norm)
        for layer, moe in model.moe_layers():  # stateful routers (biases, schedules) follow the global load
            moe.router.step_done(counts[layer][:-2])

    # Everything the record needs, in two host transfers.
    micro_steps = pmesh.dp * len(micro_batches)
    totals = sums.tolist()
    rows = dict(zip(layers, torch.stack([counts[layer] for layer in layers]).tolist())) if layers else {}
    lm_loss, aux_loss, z_loss = totals[0] / global_tokens, totals[1] / micro_steps, totals[2] / micro_steps
    router = {layer: {"aux_loss": totals[3 + 3 * i] / micro_steps, "z_loss": totals[4 + 3 * i] / micro_steps,
                      "entropy": totals[5 + 3 * i] / micro_steps, **router_state[layer]}
              for i, layer in enumerate(layers)}
    return StepResult(
        loss=lm_loss + aux_loss + z_loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss,
        grad_norm=grad_norm.item(), tokens=global_tokens, skipped=not finite,
        expert_load={layer: row[:-2] for layer, row in rows.items()},
        dropped_fraction={layer: row[-2] / max(1, sum(row[:-2])) for layer, row in rows.items()},
        unrouted_fraction={layer: row[-1] / global_tokens for layer, row in rows.items()},
        router=router,
    )
