"""AdamW with decoupled weight decay on matrices only, and warmup + cosine LR."""
from __future__ import annotations

import math

import torch
from torch import nn

from moeyard.trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Decay matrices (embeddings, projections, experts); leave norm gains alone.

    Call after expert parallelism is applied, so the optimizer holds this rank's
    expert shard. Element-wise AdamW makes a sharded expert's update identical
    to the unsharded one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to optim.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
