"""The learning-rate schedule: linear warmup, then cosine decay (the optimizer is built by
`moeyard.parallel.parallelize`, which knows how parameters are sharded)."""
from __future__ import annotations

import math

from moeyard.trainer.config.sections import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to optim.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
