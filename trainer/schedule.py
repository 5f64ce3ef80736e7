"""From the config's `schedule` section to a Plan (what runs it is `moeyard.parallel.parallelize`)."""
from __future__ import annotations

from pathlib import Path

import torch

from moeyard.parallel import ParallelMesh
from moeyard.parallel.scheduler.cost_model import Costs, Workload, predict, workload_for
from moeyard.parallel.scheduler.hardware import Hardware, HardwareCosts
from moeyard.parallel.scheduler.plan import Plan
from moeyard.parallel.scheduler.planner import manual_plan, reference_plan, search, with_prediction
from moeyard.parallel.scheduler.profiler import MeasuredCosts, load_or_measure
from moeyard.trainer.config import Config
from moeyard.trainer.data.tokens import default_cache_root
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.precision import resolve_dtype


def workload(cfg: Config, dp: int, act_bytes: int) -> Workload:
    """Shapes of one rank's step for this run on `dp` ranks, with activations of `act_bytes` bytes."""
    per_rank = cfg.global_batch_sequences // dp
    micro = cfg.train.micro_batch_size or per_rank
    return workload_for(cfg.model, tokens=micro * cfg.train.seq_len, seq_len=cfg.train.seq_len, ep=cfg.parallel.ep,
                        dp=dp, micro_steps=per_rank // micro, act_bytes=act_bytes,
                        frozen=frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen))


def act_bytes(cfg: Config, device: torch.device) -> int:
    return 2 if resolve_dtype(cfg.train.dtype, device) == torch.bfloat16 else 4


def profile_cache_dir() -> Path:
    return default_cache_root() / "profiles"


def _costs(cfg: Config, w: Workload, pmesh: ParallelMesh, device: torch.device) -> Costs:
    if cfg.schedule.hardware:
        return HardwareCosts(Hardware.load(cfg.schedule.hardware))
    profile, _ = load_or_measure(cfg.model, w, pmesh, device, resolve_dtype(cfg.train.dtype, device),
                                 profile_cache_dir())
    return MeasuredCosts(profile)


def plan_for(cfg: Config, pmesh: ParallelMesh, device: torch.device) -> Plan:
    """off/manual: as configured (predicted too with schedule.predict). auto: measure and search.
    Collective when it profiles (auto, or predict without a hardware description)."""
    s = cfg.schedule
    w = workload(cfg, pmesh.dp, act_bytes(cfg, device))
    if s.mode == "auto":
        return search(w, _costs(cfg, w, pmesh, device), s.grad_sync)[0]
    plan = reference_plan(w, s.grad_sync) if s.mode == "off" else manual_plan(w, s.chunks, s.bucket_mb, s.grad_sync)
    return with_prediction(plan, predict(w, plan, _costs(cfg, w, pmesh, device))) if s.predict else plan
