"""Does this run fit this machine's memory, and if not, what would?

The memory model (`moeyard.trainer.scheduler.memory_model`) predicts a rank's peak from the config and
the layout. Here a run's config becomes that layout, `moeyard plan` gets its `memory per rank:` line,
and `moeyard train` its check before any worker starts: a run that does not fit is refused with the
numbers and what would fit; with schedule.mode=auto the launcher picks the first layout that fits.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moeyard.errors import ConfigError
from moeyard.models.float8 import eligible
from moeyard.models.recompute import RECOMPUTE_MODES
from moeyard.trainer.config.sections import Config, accepted
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.precision import resolve_dtype
from moeyard.trainer.scheduler.memory_model import (
    GB,
    Layout,
    MemoryEstimate,
    count_parameters,
    predict_memory,
    smallest_world,
)

RECOMPUTE = RECOMPUTE_MODES
"""train.recompute from keeping the most to keeping the least."""


def memory_layout(cfg: Config, world: int, act_bytes: int) -> Layout:
    """What the memory model needs to know of this run on `world` ranks."""
    per_rank = cfg.global_batch_sequences // (world // cfg.parallel.pp)  # each stage's ranks split the batch
    micro = cfg.train.micro_batch_size or max(1, per_rank)
    grad_sync = cfg.grad_sync
    return Layout(world=world, ep=cfg.parallel.ep, tokens=micro * cfg.train.seq_len, grad_sync=grad_sync,
                  recompute=cfg.train.recompute, act_bytes=act_bytes, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                  frozen=frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen),
                  micro_steps=max(1, per_rank // micro),
                  bucketed=grad_sync == "reduce_scatter" or (cfg.schedule.mode != "off" and cfg.parallel.pp == 1),
                  gather_once=grad_sync == "fsdp" and cfg.parallel.fsdp_gather_once,
                  reduce_once=cfg.parallel.reduce_once,
                  reduce_bytes=cfg.parallel.reduce_bytes,
                  moment_bytes=cfg.optim.moment_bytes, pp=cfg.parallel.pp, pipeline=cfg.schedule.pipeline,
                  stages_per_rank=cfg.stages_per_rank, layers_per_stage=tuple(cfg.parallel.layers_per_stage or ()),
                  defer_weight_gradients=cfg.schedule.defer_weight_gradients,
                  fp8_experts=cfg.train.fp8 == "rowwise" and eligible(cfg.model.dim, cfg.model.moe.ffn_dim),
                  lanes=cfg.lanes)


def _what_would_fit(cfg: Config, layout: Layout, capacity_gb: float) -> str:
    fewest = smallest_world(cfg.model, layout, capacity_gb)
    hint = (f"it would fit on {fewest} ranks (a multiple of parallel.ep={layout.ep})" if fewest else
            f"no world size up to 4096 fits with parallel.ep={layout.ep}: activations or the unsharded state "
            f"alone are too large")
    if layout.grad_sync != "fsdp":
        hint += "; parallel.fsdp=true shards the rest of the model state too"
    if layout.gather_once and layout.reduce_once is not False:  # on every pipeline rank, or on some
        hint += "; parallel.fsdp_reduce_once=false reduces every micro-step, keeping only the weights unsharded"
    if layout.gather_once:
        hint += "; parallel.fsdp_gather_once=false keeps the weights and gradients sharded between micro-steps"
    if layout.recompute == "none":
        hint += "; train.recompute=selective keeps only the GEMM outputs"
    if layout.recompute != "full":
        hint += "; train.recompute=full keeps only each block's input"
    return hint


def memory_report(cfg: Config, world: int, act_bytes: int, capacity_gb: float = 0.0, device: str = "") -> str:
    """The `memory per rank:` line and, when it does not fit, what would. capacity_gb 0: unknown."""
    layout = memory_layout(cfg, world, act_bytes)
    estimate = predict_memory(cfg.model, layout)
    line = estimate.line(capacity_gb, device)
    if not capacity_gb or estimate.fits(capacity_gb):
        return line
    return f"{line}\n{_what_would_fit(cfg, layout, capacity_gb)}"


def _alternatives(cfg: Config, world: int) -> Iterator[tuple[list[str], Config]]:
    """Layouts that hold less, in the order auto tries them: the configured micro-batch before smaller ones
    (fewer tokens per GEMM), then less kept for backward, then more state sharded; only those the run
    config's checks accept (with pipeline stages: no ZeRO, no fsdp under overlapped_1f1b, at least pp
    micro-batches)."""
    return ((overrides, run) for overrides, run in _candidates(cfg, world) if accepted(run, world))


def _candidates(cfg: Config, world: int) -> Iterator[tuple[list[str], Config]]:
    per_rank = cfg.global_batch_sequences // (world // cfg.parallel.pp)  # a stage's ranks split the batch
    largest = cfg.train.micro_batch_size or per_rank
    micros = [m for m in range(largest, 0, -1) if per_rank % m == 0]
    syncs = ["configured"] + ([] if cfg.parallel.fsdp else
                              (["reduce_scatter"] if cfg.schedule.grad_sync == "all_reduce" else []) + ["fsdp"])
    if cfg.parallel.fsdp_gather_once:  # resident weights where some pipeline rank reduces once
        syncs += (["fsdp resident weights"] if cfg.parallel.reduce_once is not False else []) + ["fsdp per micro-step"]
    for micro in micros:
        # Modes keep less in no fixed order (selective can keep less than experts at long sequences):
        # the configured one first, then every other that keeps something back, fastest first.
        for recompute in [cfg.train.recompute] + [r for r in RECOMPUTE if r not in (cfg.train.recompute, "none")]:
            for sync in syncs:
                overrides, train, parallel, schedule = [], cfg.train, cfg.parallel, cfg.schedule
                if micro != largest:
                    overrides.append(f"train.micro_batch_size={micro}")
                    train = dataclasses.replace(train, micro_batch_size=micro)
                if recompute != cfg.train.recompute:
                    overrides.append(f"train.recompute={recompute}")
                    train = dataclasses.replace(train, recompute=recompute)
                if sync == "fsdp":
                    overrides += ["parallel.fsdp=true", "schedule.grad_sync=all_reduce"]
                    parallel = dataclasses.replace(parallel, fsdp=True)
                    schedule = dataclasses.replace(schedule, grad_sync="all_reduce")
                elif sync == "fsdp resident weights":  # the unsharded gradients go, the weights stay
                    overrides.append("parallel.fsdp_reduce_once=false")
                    parallel = dataclasses.replace(parallel, fsdp_reduce_once=False)
                elif sync == "fsdp per micro-step":
                    overrides.append("parallel.fsdp_gather_once=false")
                    if parallel.fsdp_reduce_once is not True:  # false, or one value per pipeline rank
                        overrides.append("parallel.fsdp_reduce_once=true")
                    parallel = dataclasses.replace(parallel, fsdp_gather_once=False, fsdp_reduce_once=True)
                elif sync == "reduce_scatter":
                    overrides.append("schedule.grad_sync=reduce_scatter")
                    schedule = dataclasses.replace(schedule, grad_sync="reduce_scatter")
                yield overrides, dataclasses.replace(cfg, train=train, parallel=parallel, schedule=schedule)


@dataclass(frozen=True)
class MemoryBudget:
    """What each rank of a run may hold: `capacity_gb`, of which `reserve_gb` goes to the runtime, on `device`
    (which sets the activation dtype); `what` names it in messages (one GPU, the host's memory)."""

    capacity_gb: float
    reserve_gb: float
    what: str
    device: torch.device


def act_bytes(cfg: Config, device: torch.device) -> int:
    """Bytes per activation element of this run on `device`."""
    return 2 if resolve_dtype(cfg.train.dtype, device) == torch.bfloat16 else 4


def fit_memory(cfg: Config, world: int, budget: MemoryBudget) -> tuple[Config, list[str], str]:
    """(the run that fits, the overrides that made it so, what to print) for `world` ranks of `budget`.
    The configured run when it fits; with schedule.mode=auto, the first alternative that fits. Raises
    ConfigError, with the numbers, when nothing does."""
    usable = budget.capacity_gb - budget.reserve_gb
    activation = act_bytes(cfg, budget.device)
    counts = count_parameters(cfg.model, cfg.parallel.ep, frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen))

    def estimate(run: Config) -> MemoryEstimate:
        return predict_memory(run.model, memory_layout(run, world, activation), counts)

    configured = estimate(cfg)
    where = f"{budget.what} ({budget.capacity_gb:.1f} GB per rank, {budget.reserve_gb:g} GB of it for the runtime)"
    if configured.fits(usable):
        return cfg, [], f"{configured.line()}; fits {where}"
    if cfg.schedule.mode == "auto":
        for overrides, run in _alternatives(cfg, world):
            chosen = estimate(run)
            if overrides and chosen.fits(usable):
                return run, overrides, (f"{configured.line()}: does not fit {where}; schedule.mode=auto chose "
                                        f"{' '.join(overrides)}: {chosen.total / GB:.2f} GB")
    tried = " (schedule.mode=auto found no micro-batch size, recompute mode or sharding that fits)" \
        if cfg.schedule.mode == "auto" else ""
    raise ConfigError(f"{configured.line()}: does not fit {where}{tried}; "
                      f"{_what_would_fit(cfg, memory_layout(cfg, world, activation), usable)}; "
                      f"or schedule.memory_check=false to start anyway")
