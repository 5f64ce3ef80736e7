"""From the config's `schedule` section to a Plan: the run's workload, its unit costs (a hardware
description, or a profile of this machine cached per machine and shapes) and the planner's choice.
What runs a plan is `moeyard.parallel.parallelize`; this module owns the files the scheduler reads."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from moeyard import configs
from moeyard.models import ModelConfig
from moeyard.parallel import ParallelMesh, build_mesh
from moeyard.parallel.agree import from_rank0
from moeyard.parallel.plan import Plan, ReduceOnce
from moeyard.trainer.config.sections import WITHOUT_FSDP, Config
from moeyard.trainer.data.tokens import default_cache_root
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.precision import resolve_dtype
from moeyard.trainer.scheduler.cost_model import Costs, Prediction, Workload, predict, workload_for
from moeyard.trainer.scheduler.hardware import Hardware, HardwareCosts
from moeyard.trainer.scheduler.measured_costs import MeasuredCosts, Profile, profile_from_dict
from moeyard.trainer.scheduler.memory_fit import RECOMPUTE, act_bytes, memory_layout
from moeyard.trainer.scheduler.memory_model import count_parameters, predict_memory, usable_memory_gb
from moeyard.trainer.scheduler.planner import manual_plan, reference_plan, search, with_prediction
from moeyard.trainer.scheduler.profiler import measure_everywhere, profile_key


def workload(cfg: Config, dp: int, act_bytes: int, ranks_per_node: Optional[int] = None) -> Workload:
    """Shapes of one rank's step for this run with `dp` ranks splitting the batch (a pipeline stage's, of
    parallel.pp), with activations of `act_bytes` bytes, on machines of `ranks_per_node` ranks (default
    parallel.ranks_per_node)."""
    per_rank = cfg.global_batch_sequences // dp
    micro = cfg.train.micro_batch_size or per_rank
    return workload_for(cfg.model, tokens=micro * cfg.train.seq_len, seq_len=cfg.train.seq_len, ep=cfg.parallel.ep,
                        dp=dp, micro_steps=per_rank // micro, act_bytes=act_bytes,
                        frozen=frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen),
                        recompute=cfg.train.recompute,
                        ranks_per_node=ranks_per_node or cfg.parallel.ranks_per_node or 0,
                        grad_bytes=cfg.parallel.reduce_bytes, moment_bytes=cfg.optim.moment_bytes,
                        loss_chunk_tokens=cfg.train.loss_chunk_tokens, pp=cfg.parallel.pp,
                        stages_per_rank=cfg.stages_per_rank,
                        layers_per_stage=tuple(cfg.parallel.layers_per_stage or ()),
                        overlapped=cfg.lanes, v_shape=cfg.v_shape,
                        deferred_weight_steps=cfg.defers_weight_gradients, fp8=cfg.train.fp8,
                        fp8_dispatch=cfg.train.fp8_dispatch)


def run_mesh(cfg: Config, device_type: str) -> ParallelMesh:
    """The run's process groups as its config lays them out (with twins for the backward lane of
    overlapped_1f1b and dualpipev, parallel/lanes.py: Config.lanes). Collective."""
    return build_mesh(cfg.parallel.ep, device_type, cfg.parallel.timeout_s, cfg.parallel.ranks_per_node,
                      cfg.parallel.pp, lanes=cfg.lanes)


def profile_cache_dir() -> Path:
    return default_cache_root() / "profiles"


def load_hardware(path: str | Path) -> Hardware:
    """A hardware description: a YAML file, or the name of a shipped one (dgx-h100, cpu-2core)."""
    path = Path(path)
    if not path.is_file():
        shipped = configs.path(f"hardware/{path.name}.yaml")
        if not shipped.is_file():
            raise FileNotFoundError(f"hardware description {path} does not exist; shipped: "
                                    f"{', '.join(p.stem for p in shipped.parent.glob('*.yaml'))}")
        path = shipped
    return Hardware.from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def _profile_path(cfg: ModelConfig, w: Workload, device: torch.device, cache_dir: Path) -> tuple[str, Path]:
    key = profile_key(cfg, w, device)
    return key, cache_dir / f"profile-{key}.json"


def _write_profile(path: Path, profile: Profile) -> None:
    """Written whole under a temporary name, then renamed: a reader never sees half a profile."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(profile), indent=1))
    os.replace(tmp, path)


def load_or_measure(cfg: ModelConfig, w: Workload, pmesh: ParallelMesh, device: torch.device, dtype: torch.dtype,
                    cache_dir: Path) -> tuple[Profile, bool]:
    """The cached profile for this machine, layout and shapes, or a fresh one (collective either way).

    Returns (profile, came_from_cache). Rank 0 reads and writes the cache and shares what it read, so
    every rank plans from the same numbers.
    """
    key, path = _profile_path(cfg, w, device, cache_dir)

    def read_cache() -> Optional[Profile]:
        if not path.is_file():
            return None
        try:
            return profile_from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:  # unreadable: measure again (every rank learns it)
            print(f"warning: ignoring unreadable profile cache {path}: {err}", flush=True)
            return None

    cached = from_rank0(read_cache, RuntimeError, f"reading the profile cache {path}")
    if cached is not None:
        return cached, True
    profile = measure_everywhere(cfg, w, pmesh, device, dtype, key)
    if dist.get_rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_profile(path, profile)
    return profile, False


def _costs(cfg: Config, w: Workload, pmesh: ParallelMesh, device: torch.device) -> Costs:
    if cfg.schedule.hardware:
        return HardwareCosts(load_hardware(cfg.schedule.hardware))
    profile, _ = load_or_measure(cfg.model, w, pmesh, device, resolve_dtype(cfg.train.dtype, device),
                                 profile_cache_dir())
    return MeasuredCosts(profile)


LAYOUT_MARGIN = 0.02
"""auto: another layout replaces the configured one only when predicted this much faster."""


def dispatch_choices(cfg: Config, w: Workload) -> tuple[str, ...]:
    """What the planner may choose per MoE layer: hierarchical only where the ep group spans machines."""
    if w.ep_nodes == 1 or cfg.schedule.dispatch == "flat":
        return ("flat",)
    return ("hierarchical",) if cfg.schedule.dispatch == "hierarchical" else ("flat", "hierarchical")


@dataclass(frozen=True)
class Layout:
    """Where the model state lives and how it moves."""

    name: str
    grad_sync: str
    """all_reduce (replicated), reduce_scatter (ZeRO) or fsdp."""
    gather_once: bool = False
    reduce_once: ReduceOnce = True
    """With gather_once: gradients reduced once per step; False, in every micro-step; or one value per pipeline
    rank (Plan.reduce_once)."""

    @property
    def key(self) -> tuple[str, bool, ReduceOnce]:
        return self.grad_sync, self.gather_once, self.reduce_once

    def of(self, plan: Plan) -> bool:
        """Whether `plan` lays the state out this way."""
        return self.key == (plan.grad_sync, plan.gather_once, plan.reduce_once)


LAYOUTS = (Layout("replicated", "all_reduce"), Layout("ZeRO", "reduce_scatter"),
           Layout("fsdp per micro-step", "fsdp"), Layout("fsdp gathered once", "fsdp", gather_once=True),
           Layout("fsdp resident weights", "fsdp", gather_once=True, reduce_once=False))


def resident_weights(reduce_once: Sequence[bool]) -> Layout:
    """fsdp gathered once with each pipeline rank's own choice of reducing once (`reduce_once[r]`) or in every
    micro-step, named for how many of the ranks reduce once; one of LAYOUTS where every rank chooses alike."""
    once = tuple(bool(o) for o in reduce_once)
    if all(once) or not any(once):
        return next(layout for layout in LAYOUTS if layout.key == ("fsdp", True, once[0]))
    return Layout(f"fsdp resident, once on {sum(once)}/{len(once)}", "fsdp", gather_once=True, reduce_once=once)


PIPELINED = ("replicated", "fsdp per micro-step", "fsdp gathered once", "fsdp resident weights")
"""The layouts parallel.pp > 1 runs: all but ZeRO, whose gradient buckets are cut for the whole model
(config/sections._validate_pipeline); replicated gradients are reduced after the schedule (PlainSync)."""


def layouts_for(pp: int, pipeline: str) -> tuple[Layout, ...]:
    """The layouts a run of `pp` stages under schedule.pipeline `pipeline` may take: all without stages; with
    them PIPELINED, less fsdp under the schedules config/sections refuses it with (WITHOUT_FSDP)."""
    if pp == 1:
        return LAYOUTS
    return tuple(layout for layout in LAYOUTS if layout.name in PIPELINED
                 and not (pipeline in WITHOUT_FSDP and layout.grad_sync == "fsdp"))


def configured_layout(cfg: Config) -> Layout:
    once = cfg.parallel.fsdp and cfg.parallel.fsdp_gather_once
    if once and isinstance(cfg.parallel.fsdp_reduce_once, list):
        return resident_weights(cfg.parallel.fsdp_reduce_once)
    key = (cfg.grad_sync, once, cfg.parallel.fsdp_reduce_once or not once)
    return next(layout for layout in LAYOUTS if layout.key == key)


def planned_layout(plan: Plan) -> Layout:
    if plan.grad_sync == "fsdp" and plan.gather_once and isinstance(plan.reduce_once, tuple):
        return resident_weights(plan.reduce_once)
    return next(layout for layout in LAYOUTS if layout.of(plan))


@dataclass(frozen=True)
class LayoutChoice:
    """One layout and recompute mode, planned and predicted."""

    layout: Layout
    recompute: str
    plan: Plan
    prediction: Prediction
    memory_gb: float
    """Predicted peak per rank."""
    fits: bool

    @property
    def name(self) -> str:
        return self.layout.name


def as_layout(cfg: Config, layout: Layout, recompute: str) -> Config:
    """`cfg` with this layout's gradient sync, gathering and reduction, and this recompute mode."""
    fsdp = layout.grad_sync == "fsdp"
    once = layout.reduce_once
    parallel = dataclasses.replace(cfg.parallel, fsdp=fsdp, fsdp_gather_once=layout.gather_once,
                                   fsdp_reduce_once=once if isinstance(once, bool) else list(once))
    return dataclasses.replace(
        cfg, parallel=parallel, schedule=dataclasses.replace(cfg.schedule, grad_sync="all_reduce" if fsdp else
                                                             layout.grad_sync),
        train=dataclasses.replace(cfg.train, recompute=recompute))


def layout_choices(cfg: Config, w: Workload, costs: Costs, capacity_gb: float) -> list[LayoutChoice]:
    """Every layout and recompute mode with its memory against `capacity_gb` (usable GB per rank), planned
    where it fits and for the configured one; the others are predicted at r=1 only (the search is what
    costs). The configured layout comes first. Reducing once a step is weighed only with float32 reduction: it
    accumulates the micro-steps' gradients in parallel.reduce_dtype, which would round them in bfloat16."""
    configured = configured_layout(cfg)
    bf16_reduce = cfg.parallel.effective_reduce_dtype != "float32"
    layouts = [configured] + [layout for layout in layouts_for(w.pp, cfg.schedule.pipeline) if layout != configured
                              and not (layout.gather_once and layout.reduce_once and bf16_reduce)]
    recomputes = [cfg.train.recompute] + [r for r in RECOMPUTE if r != cfg.train.recompute]
    dispatch = dispatch_choices(cfg, w)
    counts = count_parameters(cfg.model, cfg.parallel.ep, frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen))
    choices = []
    for layout in layouts:
        for recompute in recomputes:
            run = as_layout(cfg, layout, recompute)
            memory = predict_memory(cfg.model, memory_layout(run, w.dp * w.pp, w.act_bytes), counts)
            fits = memory.total <= capacity_gb * 1e9
            shaped = dataclasses.replace(w, recompute=recompute)
            if fits or not choices:
                plan, best = search(shaped, costs, layout.grad_sync, dispatch_choices=dispatch,
                                    gather_once=layout.gather_once, reduce_once=layout.reduce_once)
            else:
                plan = dataclasses.replace(reference_plan(shaped, layout.grad_sync), gather_once=layout.gather_once,
                                           reduce_once=layout.reduce_once)
                best = predict(shaped, plan, costs)
            plan = dataclasses.replace(plan, recompute=recompute if recompute != cfg.train.recompute else "")
            choices.append(LayoutChoice(layout, recompute, plan, best, memory.total / 1e9, fits))
    return choices


def auto_plan(cfg: Config, w: Workload, costs: Costs, capacity_gb: float = 0.0) -> tuple[Plan, Prediction]:
    """The planner's choice of layout. With the memory per rank known (`capacity_gb`, usable GB): the
    fastest layout and recompute mode that fit (choose_layout). Unknown: the configured gradient sync, or
    fsdp per micro-step (which holds less than any replicated sync) where that is faster."""
    if capacity_gb > 0:
        return choose_layout(layout_choices(cfg, w, costs, capacity_gb))
    dispatch = dispatch_choices(cfg, w)
    layout = configured_layout(cfg)
    plan, best = search(w, costs, cfg.grad_sync, dispatch_choices=dispatch, gather_once=layout.gather_once,
                        reduce_once=layout.reduce_once)
    if not cfg.parallel.fsdp and any(layout.grad_sync == "fsdp" for layout in layouts_for(w.pp, cfg.schedule.pipeline)):
        sharded, sharded_best = search(w, costs, "fsdp", dispatch_choices=dispatch)
        if sharded_best.step < best.step * (1 - LAYOUT_MARGIN):
            return sharded, sharded_best
    return plan, best


def choose_layout(choices: list[LayoutChoice]) -> tuple[Plan, Prediction]:
    """The fastest choice that fits, where the configured one (the first) does not fit or is slower by more
    than LAYOUT_MARGIN; the configured one where none fits (the launcher's memory check refuses it, with
    what would fit, unless schedule.memory_check=false)."""
    configured = choices[0]
    fitting = [c for c in choices if c.fits]
    if not fitting:
        return configured.plan, configured.prediction
    fastest = min(fitting, key=lambda c: c.prediction.step)
    if configured.fits and fastest.prediction.step >= configured.prediction.step * (1 - LAYOUT_MARGIN):
        return configured.plan, configured.prediction
    return fastest.plan, fastest.prediction


def agreed_capacity_gb(device: torch.device) -> float:
    """usable_memory_gb of this rank's device, the smallest over all ranks (collective): every rank must
    choose the same layout, also on mixed GPUs or MIG slices."""
    capacity = torch.tensor([usable_memory_gb(device)], dtype=torch.float64, device=device)
    dist.all_reduce(capacity, op=dist.ReduceOp.MIN)
    return float(capacity)


def plan_for(cfg: Config, pmesh: ParallelMesh, device: torch.device) -> Plan:
    """off/manual: as configured (predicted too with schedule.predict). auto: measure and search, over
    the configured gradient sync and fsdp. Collective when it profiles (auto, or predict without a
    hardware description)."""
    s = cfg.schedule
    w = workload(cfg, pmesh.dp, act_bytes(cfg, device))
    if s.mode == "auto":
        return auto_plan(cfg, w, _costs(cfg, w, pmesh, device), agreed_capacity_gb(device))[0]
    plan = reference_plan(w, cfg.grad_sync) if s.mode == "off" else \
        manual_plan(w, s.chunks, s.bucket_mb, cfg.grad_sync)
    layout = configured_layout(cfg)
    plan = dataclasses.replace(plan, gather_once=layout.gather_once, reduce_once=layout.reduce_once)
    if dispatch_choices(cfg, w) != ("flat",):  # off/manual: auto means hierarchical wherever ep spans machines
        plan = dataclasses.replace(plan, dispatch=("hierarchical",) * len(plan.chunks))
    return with_prediction(plan, predict(w, plan, _costs(cfg, w, pmesh, device))) if s.predict else plan


def learn_chunk_overhead(cfg: Config, dp: int, device: torch.device, plan: Plan, plan_s: float,
                         reference_s: float) -> Optional[str]:
    """After the run measured its plan slower than r=1: raise the cached profile's cost per extra pipeline
    chunk so that it predicts what was measured, and the next plan for this machine and these shapes is
    made knowing it. Rank 0 rewrites the cache; returns what it changed (None: planned from a hardware
    description, or no cached profile)."""
    if cfg.schedule.hardware or "r1_step_s" not in plan.predicted or dist.get_rank() != 0:
        return None
    w = workload(cfg, dp, act_bytes(cfg, device))
    _, path = _profile_path(cfg.model, w, device, profile_cache_dir())
    if not path.is_file():
        return None
    profile = profile_from_dict(json.loads(path.read_text()))
    passes = 3 if (plan.recompute or cfg.train.recompute) == "full" else 2
    extra_chunks = w.micro_steps * passes * sum(r - 1 for r in plan.chunks)
    predicted_gain = plan.predicted["r1_step_s"] - plan.predicted["step_s"]  # the same buckets at r=1
    added = max(0.0, (plan_s - reference_s + predicted_gain) / extra_chunks)
    learned = dataclasses.replace(profile, chunk_overhead_s=profile.chunk_overhead_s + added)
    _write_profile(path, learned)
    return (f"profile {path.name}: cost per extra pipeline chunk {profile.chunk_overhead_s * 1e3:.3f} -> "
            f"{learned.chunk_overhead_s * 1e3:.3f} ms, from this run's measurement")
