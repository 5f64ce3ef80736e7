"""The training loop: build everything from the config, resume, run the steps, log, checkpoint, stop.

Runs inside an initialised default process group (one process is a group of
one); how the ranks were started is the launcher's business.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.errors import CheckpointError, DataError
from moeyard.models import Transformer
from moeyard.models.attention_kernels import Target, kernel_names
from moeyard.models.float8 import float8_unsupported
from moeyard.models.meta_init import build_on_meta
from moeyard.parallel import ParallelMesh
from moeyard.parallel.grads.sync import GradSync
from moeyard.parallel.parallelize import FsdpSettings, parallelize
from moeyard.parallel.plan import Plan
from moeyard.parallel.stages import SPLIT_BACKWARD, stage_layers
from moeyard.trainer.checkpoint.sharded import Checkpointer, config_hash
from moeyard.trainer.config.sections import Config
from moeyard.trainer.data.blend import DataPosition, TokenBatches
from moeyard.trainer.data.compat import corpus_sources, data_record
from moeyard.trainer.data.sft_batches import SFTBatch, SFTBatches, SFTData, heldout_share
from moeyard.trainer.evaluator import Evaluator
from moeyard.trainer.freezing import freeze
from moeyard.trainer.lr_schedule import lr_at
from moeyard.trainer.memory_stats import model_state_line
from moeyard.trainer.metrics import StepReporter
from moeyard.trainer.nonfinite import NonFiniteGuard
from moeyard.trainer.precision import resolve_dtype
from moeyard.trainer.preflight import check_checkpoint_fits, check_pretraining_data
from moeyard.trainer.run_dir import Preemption, mark_preempted, prepare_run_dir
from moeyard.trainer.scheduler.plan_check import PlanCheck
from moeyard.trainer.scheduler.run_planning import learn_chunk_overhead, plan_for, run_mesh
from moeyard.trainer.step import pipeline_for, train_step


@dataclass(frozen=True)
class Outcome:
    step: int
    """Steps completed when the loop ended."""
    signal: int = 0
    """The preemption signal that ended it early (0: none)."""


def _load_init(cfg: Config, checkpointer: Checkpointer, model) -> None:
    """A fresh run starting from checkpoint.init's weights (its files checked first, by all ranks)."""
    path = Path(cfg.checkpoint.init)
    try:
        manifest = checkpointer.load_weights(path, model)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint.init: {err}") from None
    frozen = any(not p.requires_grad for p in model.parameters())
    if frozen and not cfg.checkpoint.save_frozen:
        checkpointer.refer_to_base(path, model)
    if dist.get_rank() == 0:
        print(f"initialised from {path} ({manifest.get('source', {}).get('family', 'moeyard')} weights, "
              f"step {manifest['step']} of its run)", flush=True)
        if checkpointer.base is not None:
            print(f"checkpoints will hold the trainable weights only and refer to {path} (content hash "
                  f"{checkpointer.base['content_hash']}) for the frozen ones: keep it there, or set "
                  f"checkpoint.save_frozen=true", flush=True)


def _resume_or_init(cfg: Config, checkpointer: Checkpointer, model, sync) -> tuple[int, dict | None]:
    """Load the checkpoint to resume from (returns its step and manifest), or checkpoint.init's weights
    (returns 0, None)."""
    resume = checkpointer.find_resume_point()
    if resume is None:
        if cfg.checkpoint.init:
            _load_init(cfg, checkpointer, model)
        return 0, None
    resume_from, manifest = resume
    checkpointer.load(resume_from, manifest, model, sync)
    if dist.get_rank() == 0:
        changed = " (the model or data config changed since it was saved)" \
            if manifest["config_hash"] != config_hash(cfg) else ""
        print(f"resumed from {resume_from} at step {manifest['step']}{changed}", flush=True)
    return manifest["step"], manifest


def _batches(cfg: Config, pmesh: ParallelMesh) -> tuple[TokenBatches | SFTBatches, SFTBatch | None]:
    """This rank's share of every global batch, and of the held-out SFT examples (None: pretraining)."""
    if cfg.sft.data is None:
        return TokenBatches(corpus_sources(cfg.data), cfg.train.seq_len, cfg.global_batch_sequences, pmesh.dp_rank,
                            pmesh.dp, cfg.run.seed, document_mask=cfg.data.document_mask), None
    sft_data = SFTData(cfg, log=dist.get_rank() == 0)
    return (SFTBatches(sft_data, cfg.global_batch_sequences, pmesh.dp_rank, pmesh.dp, cfg.run.seed),
            heldout_share(sft_data, pmesh.dp_rank, pmesh.dp))


def _check_before_start(cfg: Config) -> dict[str, dict]:
    """The data and checkpoint this run reads, as the ranks find them (a launcher under srun or mpirun checked
    nothing); the corpora's meta.json by name (none for SFT)."""
    if cfg.sft.data is None and cfg.data.dir is None and not cfg.data.sources:
        raise DataError("data.dir is not set: resolving the run config sets it (trainer.config.resolve)")
    metas = check_pretraining_data(cfg) if cfg.sft.data is None else {}
    check_checkpoint_fits(cfg)  # before prepare_run_dir rewrites config.yaml
    return metas


def _follow_data(cfg: Config, data: TokenBatches | SFTBatches, metas: dict[str, dict], checkpointer: Checkpointer,
                 manifest: dict | None, step: int) -> None:
    """Pretraining: continue from the resumed checkpoint's data position, and record the position (with the
    tokenizer and sources) in every checkpoint from now on."""
    if not isinstance(data, TokenBatches):
        return
    sources = corpus_sources(cfg.data)
    record = data_record(metas, sources)
    checkpointer.data_state = lambda n: {**record, "position": data.position_at(n).to_dict()}
    saved = (manifest or {}).get("data") or {}
    if "position" not in saved:
        return  # a fresh run, or a checkpoint from before positions were saved: replayed from step 0
    position = DataPosition.from_dict(saved["position"])
    data.restore(position, step)
    if dist.get_rank() != 0:
        return
    if data.changed_blend(position):
        print(f"data.sources or their weights changed since step {step}: each source continues where it was, "
              f"the shares count from here", flush=True)
    for name, source in record["sources"].items():
        before = (saved.get("sources") or {}).get(name, {}).get("content_hash")
        if before is not None and before != source["content_hash"]:
            print(f"warning: the corpus {name!r} changed since step {step} (content hash {before} -> "
                  f"{source['content_hash']}): the batches from here differ from the uninterrupted run's", flush=True)


def _data_metrics(cfg: Config, data: TokenBatches | SFTBatches, eval_loss: float | None,
                  eval_skipped: float | None) -> dict:
    """What a logged step reports of its data: the held-out loss (SFT), the tokens drawn per source."""
    metrics: dict = {"eval_loss": eval_loss}
    if cfg.model.moe.skip_threshold:
        metrics["eval_skipped_fraction"] = eval_skipped
    if isinstance(data, TokenBatches):
        metrics["tokens_per_source"] = data.tokens_per_source()
    return metrics


def build_rank_model(cfg: Config, pmesh: ParallelMesh, plan: Plan, device: torch.device) -> tuple[Transformer, GradSync]:
    """The model of `build_model(cfg.model)` under the run's seed, whatever the layout: built on the meta
    device, parallelized as the plan says, then each rank allocates and initialises its own part."""
    torch.manual_seed(cfg.run.seed)
    model, init = build_on_meta(cfg.model)  # no rank holds more than its part (and one parameter at a time)
    # the whole model's names: the patterns mean what they mean in one process, whatever a stage holds
    trainable, total = freeze(model, cfg.train.trainable, cfg.train.frozen)
    if pmesh.pp > 1:
        # imported here: torch's pipelining imports dynamo, 0.8 s of every worker's start
        from moeyard.parallel.pipeline import keep_this_stage

        keep_this_stage(model, pmesh, cfg.stages_per_rank, cfg.parallel.layers_per_stage, cfg.schedule.pipeline)
    model.set_recompute(plan.recompute or cfg.train.recompute)  # the planner may keep more where memory allows
    # run_training refused it first where it cannot run
    fp8_layers, layers = model.set_fp8(cfg.train.fp8, cfg.train.fp8_dispatch)
    fsdp = FsdpSettings(compute_dtype=resolve_dtype(cfg.train.dtype, device),
                        reduce_dtype=getattr(torch, cfg.parallel.effective_reduce_dtype),
                        reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward)
    sync = parallelize(model, pmesh, plan, cfg.optim, device, fsdp, init)
    if dist.get_rank() == 0:
        print(f"parameters: {trainable:,} of {total:,} train ({100 * trainable / total:.2f}%)", flush=True)
        sharded = ", fsdp the rest" if plan.grad_sync == "fsdp" else ""
        state = model_state_line(model, cfg.optim.moment_bytes)
        print(f"model state per rank (ep shards the experts evenly{sharded}): {state}", flush=True)
        if cfg.train.fp8 != "none":
            dtype = str(resolve_dtype(cfg.train.dtype, device)).removeprefix("torch.")
            print(f"fp8 ({cfg.train.fp8}): {fp8_layers} of this rank's {layers} linear and expert layers in the "
                  f"blocks multiply in float8 e4m3 (torch._scaled_mm; the experts' weight gradients, layers whose "
                  f"widths are not multiples of 16, the routers, embedding and output layer in {dtype})"
                  + ("; the experts' rows dispatched as e4m3" if pmesh.ep > 1 and any(
                      getattr(m, "fp8_dispatch", False) for m in model.modules()) else ""),
                  flush=True)
        if pmesh.pp > 1:
            stages = pmesh.pp * cfg.stages_per_rank
            sizes = [len(r) for r in stage_layers(cfg.model.n_layers, stages, cfg.parallel.layers_per_stage)]
            looped = f", {cfg.stages_per_rank} a rank" + (" in a V" if cfg.v_shape else "") \
                if cfg.stages_per_rank > 1 else ""
            mtp = f" and the {cfg.model.mtp_layers} MTP depth(s) on the last" if cfg.model.mtp_layers else ""
            print(f"pipeline: {stages} stages{looped}, decoder blocks per stage {sizes}{mtp}", flush=True)
            if cfg.schedule.pipeline in SPLIT_BACKWARD:
                print("pipeline weight steps: " + (
                    "empty (schedule.defer_weight_gradients=false): the whole backward in the input step" if
                    not cfg.defers_weight_gradients else
                    "the weight gradients of the blocks' linear layers and experts (the router's, the embedding's and "
                    "the output layer's stay in the input step)" if sync.holds_reduction else
                    "empty: fsdp reducing in every micro-step reduces each unit as its input gradient is computed, so "
                    "the whole backward runs in the input step and the bubble is interleaved_1f1b's "
                    "(parallel.fsdp_gather_once=true reducing once, or parallel.fsdp=false, gives the weight steps the "
                    "weight gradients)"), flush=True)
    return model, sync


def _check_fp8(recipe: str, device: torch.device, dtype: torch.dtype) -> None:
    """train.fp8 refused by name where this device cannot run it."""
    if recipe != "none":
        reason = float8_unsupported(device, dtype)
        if reason is not None:
            raise ValueError(f"train.fp8={recipe} cannot run here: {reason}. Set train.fp8=none")


def _checked_plan(cfg: Config, check: PlanCheck | None, step_time: float, plan: Plan, pmesh: ParallelMesh,
                  device: torch.device, checkpointer: Checkpointer) -> Plan:
    """Feed the plan check one step; once it decides, the plan the run goes on with (logged, saved)."""
    trial = check.observe(step_time) if check is not None else None
    if trial is None:
        return plan
    if not trial.switched:
        if dist.get_rank() == 0:
            print(trial.message(plan.chunks), flush=True)
        return plan
    learned = learn_chunk_overhead(cfg, pmesh.dp, device, plan, trial.plan_s, trial.reference_s)
    switched = dataclasses.replace(plan, chunks=(1,) * len(plan.chunks), source="planner, r=1 after the run's check",
                                   predicted={"step_s": plan.predicted["r1_step_s"]} if "r1_step_s" in plan.predicted
                                   else {})
    checkpointer.plan = switched
    if dist.get_rank() == 0:
        print(trial.message(plan.chunks) + (f"; {learned}" if learned else ""), flush=True)
        (cfg.run_dir / "plan.json").write_text(switched.to_json())
    return switched


def _attention_kernels(cfg: Config, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The start-up log's lines naming the kernel each attention path of this run takes."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    m = cfg.model
    documents = cfg.data.document_mask or cfg.sft.data is not None
    return kernel_names(m.attention, m.attention_sinks, m.sliding_window, Target(device.type, dtype, capability),
                        documents)


def run_training(cfg: Config, device: torch.device, preemption: Preemption | None = None) -> Outcome:
    """Train up to train.stop_at (or train.steps), resuming from a checkpoint if there is one."""
    preemption = preemption or Preemption()
    metas = _check_before_start(cfg)
    rank = dist.get_rank()
    prepare_run_dir(cfg)
    pmesh = run_mesh(cfg, device.type)
    dtype = resolve_dtype(cfg.train.dtype, device)
    _check_fp8(cfg.train.fp8, device, dtype)  # before the profiler times FP8 GEMMs
    plan = plan_for(cfg, pmesh, device)  # before the model exists: profiling builds models of its own
    model, sync = build_rank_model(cfg, pmesh, plan, device)
    pipeline = pipeline_for(model, pmesh, cfg, device) \
        if pmesh.pp > 1 else None
    checkpointer = Checkpointer(cfg, pmesh, plan)

    first, resumed = _resume_or_init(cfg, checkpointer, model, sync)
    if rank == 0:
        print(f"plan ({plan.source}): {plan.summary()}", flush=True)
        (cfg.run_dir / "plan.json").write_text(plan.to_json())
        for line in _attention_kernels(cfg, device, dtype):
            print(line, flush=True)

    total = cfg.train.steps
    last = cfg.train.stop_at or total
    if first >= last:
        if rank == 0:
            print(f"nothing to do: the run is at step {first} (train.steps={total}, stop_at={cfg.train.stop_at})")
        return Outcome(first)

    micro_batch_size = cfg.train.micro_batch_size or cfg.global_batch_sequences // pmesh.dp
    data, heldout = _batches(cfg, pmesh)
    _follow_data(cfg, data, metas, checkpointer, resumed, first)
    evaluator = Evaluator(cfg, heldout, last, model, pmesh, micro_batch_size, dtype, pipeline)
    reporter = StepReporter(cfg, first, last, device, writes=rank == 0)
    guard = NonFiniteGuard(cfg, checkpointer)
    check = PlanCheck.for_run(model, plan.chunks, plan.source, cfg.schedule.check_steps, device)
    done = first
    try:
        for step in range(first, last):
            lr = lr_at(step, total, cfg.optim)
            start = time.perf_counter()
            result = train_step(model, sync, data.batch(step), micro_batch_size=micro_batch_size,
                                pmesh=pmesh, lr=lr, grad_clip=cfg.train.grad_clip, dtype=dtype,
                                loss_chunk_tokens=cfg.train.loss_chunk_tokens, pipeline=pipeline)
            step_time = time.perf_counter() - start
            plan = _checked_plan(cfg, check, step_time, plan, pmesh, device, checkpointer)
            done = step + 1
            guard.count(result)
            held = evaluator.after_step(done)
            reporter.after_step(done, result, lr, step_time, plan.predicted.get("step_s"), evaluator.due(done),
                                lambda: {"skipped_steps": guard.total, **_data_metrics(cfg, data, *held)})
            guard.stop_if_due(done, result, model, sync)
            signum = preemption.agreed(device)
            checkpointer.after_step(done, last, bool(signum), model, sync)
            if signum and done < last:  # at the last step the run is simply finished: nothing to requeue
                if rank == 0:
                    mark_preempted(cfg.run_dir, done, signum)
                    print(f"received {signal.Signals(signum).name}: saved step {done}, exiting", flush=True)
                return Outcome(done, signum)
        checkpointer.finish()
    finally:
        preemption.restore()
        reporter.close()
    if rank == 0:
        what = "finished" if done == total else f"stopped at train.stop_at={last} of"
        print(f"{what} {total} steps; outputs in {cfg.run_dir}", flush=True)
    return Outcome(done)
