"""The training loop: build everything from the config, run the steps, log, checkpoint.

Runs inside an initialised default process group (one process is a group of
one); how the ranks were started is the launcher's business.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.models import Transformer
from moeyard.parallel import apply_expert_parallel, build_mesh, split_parameters

from .checkpoint import save_checkpoint
from .config import Config, check_vocab, dump_yaml, validate_for_world
from .data import DataError, TokenBatches, read_meta
from .metrics import MetricsLogger, step_record
from .optim import lr_at
from .precision import resolve_dtype
from .schedule import apply_plan_chunks, build_grad_sync, plan_for
from .step import train_step


def _agree_on_error(message: str | None) -> None:
    """Rank 0's verdict becomes every rank's, so no rank is left waiting in a collective."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RuntimeError(box[0])


def _prepare_run_dir(cfg: Config) -> None:
    message = None
    if dist.get_rank() == 0:
        run_dir = cfg.run_dir
        if (run_dir / "metrics.jsonl").exists():
            message = (f"run.dir {run_dir} already holds a run (metrics.jsonl exists): choose another with "
                       f"--set run.dir=... or delete it")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    _agree_on_error(message)


def train(cfg: Config, device: torch.device) -> Path:
    """Train `cfg.train.steps` steps; returns the run directory."""
    if cfg.data.dir is None:
        raise DataError("data.dir is not set: the launcher resolves it (see trainer.data.ensure_corpus)")
    world, rank = dist.get_world_size(), dist.get_rank()
    validate_for_world(cfg, world)
    check_vocab(cfg, read_meta(Path(cfg.data.dir)))
    _prepare_run_dir(cfg)
    pmesh = build_mesh(cfg.parallel.ep, device.type)
    dtype = resolve_dtype(cfg.train.dtype, device)

    torch.manual_seed(cfg.run.seed)  # same full model on every rank, whatever the layout
    model = Transformer(cfg.model)
    apply_expert_parallel(model, pmesh)
    model.to(device)
    groups = split_parameters(model)
    plan = plan_for(cfg, model, groups, pmesh, device)
    apply_plan_chunks(model, plan)
    sync = build_grad_sync(plan, model, groups, pmesh, cfg)
    if rank == 0:
        print(f"plan ({plan.source}): {plan.summary()}", flush=True)
        (cfg.run_dir / "plan.json").write_text(plan.to_json())

    data = TokenBatches(Path(cfg.data.dir), cfg.train.seq_len, cfg.global_batch_sequences,
                        pmesh.dp_rank, pmesh.dp, cfg.run.seed)
    micro_batch_size = cfg.train.micro_batch_size or cfg.global_batch_sequences // pmesh.dp

    total = cfg.train.steps
    logger = None
    if rank == 0:
        logger = MetricsLogger(cfg.run_dir, total_steps=total, first_step=0,
                               tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    try:
        for step in range(total):
            lr = lr_at(step, total, cfg.optim)
            start = time.perf_counter()
            result = train_step(model, sync, data.batch(step), micro_batch_size=micro_batch_size,
                                pmesh=pmesh, lr=lr, grad_clip=cfg.train.grad_clip, dtype=dtype)
            step_time = time.perf_counter() - start
            done = step + 1
            if logger is not None:
                logger.progress(result, result.tokens / step_time)
                if done == 1 or done % cfg.log.every == 0 or done == total:
                    logger.log(step_record(done, result, lr, step_time, plan.predicted.get("step_s")), total)
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total:
                save_checkpoint(cfg.run_dir, done, model, sync, pmesh, cfg, plan)
    finally:
        if logger is not None:
            logger.close()
    if rank == 0:
        print(f"finished {total} steps; outputs in {cfg.run_dir}", flush=True)
    return cfg.run_dir
