"""Where training numbers go: metrics.jsonl, TensorBoard and the console (rank 0), and when (StepReporter)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moeyard.trainer.config.sections import Config
from moeyard.trainer.memory_stats import peak_memory_gb
from moeyard.trainer.step import StepResult


def load_summary(counts: list[int]) -> dict[str, float]:
    """Balance of one layer: max/mean and coefficient of variation of expert load."""
    mean = sum(counts) / len(counts)
    if mean == 0:
        return {"max_over_mean": 0.0, "cv": 0.0}
    var = sum((c - mean) ** 2 for c in counts) / len(counts)
    return {"max_over_mean": max(counts) / mean, "cv": var ** 0.5 / mean}


def step_record(step: int, result: StepResult, lr: float, step_time_s: float,
                predicted_step_s: Optional[float]) -> dict[str, Any]:
    return {
        "step": step,
        "loss": result.loss,
        "lm_loss": result.lm_loss,
        "aux_loss": result.aux_loss,
        "z_loss": result.z_loss,
        **({"mtp_loss": result.mtp_loss} if result.mtp_loss is not None else {}),
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": result.tokens / step_time_s,
        "step_time_s": step_time_s,
        "predicted_step_s": predicted_step_s,
        "expert_load": {str(layer): counts for layer, counts in result.expert_load.items()},
        "expert_load_balance": {str(layer): load_summary(c) for layer, c in result.expert_load.items()},
        "dropped_fraction": {str(layer): f for layer, f in result.dropped_fraction.items()},
        "unrouted_fraction": {str(layer): f for layer, f in result.unrouted_fraction.items()},
        "router": {str(layer): values for layer, values in result.router.items()},
        **({"adapter_routers": {name: {**values, "load_balance": load_summary(values["load"])}
                                for name, values in result.adapter_routers.items()}}
           if result.adapter_routers else {}),
    }


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a line cut short by a crash mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, first_step: int, tensorboard: bool, progress: bool) -> None:
        path = run_dir / "metrics.jsonl"
        # Resuming at `first_step`: records of later steps belong to a try that did not reach a checkpoint;
        # those steps run again, so their old records go.
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if _step_of(line) is not None and _step_of(line) <= first_step]
        tmp = path.with_suffix(".jsonl.tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)  # a crash here leaves the old file, never a half-written one
        except OSError:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: no empty leftover beside the intact old file
            raise
        self.jsonl = path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where used

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step + 1)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5, disable=not sys.stderr.isatty())
        self.print_lines = progress and (self.bar is None or self.bar.disable)

    def progress(self, result: StepResult, tokens_per_s: float) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def log(self, record: dict[str, Any], total_steps: int) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.print_lines:  # no terminal (CI, log files): one line per logged step instead of a bar
            predicted = record["predicted_step_s"]
            timing = f"{record['step_time_s']:.3f}s" + (f" (plan {predicted:.3f}s)" if predicted else "")
            held = f" eval_loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else ""
            print(f"step {record['step']}/{total_steps} loss {record['loss']:.4f}{held} lr {record['lr']:.2e} "
                  f"grad_norm {record['grad_norm']:.3f} tok/s {record['tokens_per_s']:,.0f} {timing}", flush=True)
        if self.writer is None:
            return
        step = record["step"]
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                    "predicted_step_s", "peak_memory_gb"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        if record.get("eval_loss") is not None:
            self.writer.add_scalar("eval/loss", record["eval_loss"], step)
        for layer, counts in record["expert_load"].items():
            for key, value in record["expert_load_balance"][layer].items():
                self.writer.add_scalar(f"moe/layer_{layer}/{key}", value, step)
            self.writer.add_scalar(f"moe/layer_{layer}/dropped_fraction", record["dropped_fraction"][layer], step)
            self.writer.add_scalar(f"moe/layer_{layer}/unrouted_fraction", record["unrouted_fraction"][layer], step)
            self._expert_histogram(f"moe/layer_{layer}/expert_load", counts, step)
            for key, value in record["router"][layer].items():
                if isinstance(value, list) and len(value) > 1:  # e.g. one bias per expert
                    self.writer.add_histogram(f"moe/layer_{layer}/{key}", torch.tensor(value), step)
                else:
                    self.writer.add_scalar(f"moe/layer_{layer}/{key}", value[0] if isinstance(value, list) else value,
                                           step)
        for name, values in record.get("adapter_routers", {}).items():
            for key in ("aux_loss", "entropy"):
                self.writer.add_scalar(f"adapters/{name}/{key}", values[key], step)
            for key, value in values["load_balance"].items():
                self.writer.add_scalar(f"adapters/{name}/{key}", value, step)
            self._expert_histogram(f"adapters/{name}/load", values["load"], step)
        self.writer.flush()

    def _expert_histogram(self, tag: str, counts: list[int], step: int) -> None:
        """One bucket per expert index, its height the tokens that expert received."""
        n = len(counts)
        total = sum(counts)
        self.writer.add_histogram_raw(
            tag, min=0, max=n - 1, num=total,
            sum=float(sum(i * c for i, c in enumerate(counts))),
            sum_squares=float(sum(i * i * c for i, c in enumerate(counts))),
            bucket_limits=[i + 0.5 for i in range(n)], bucket_counts=counts, global_step=step,
        )

    def close(self, message: Optional[str] = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if message:
            print(message, flush=True)
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


class StepReporter:
    """What each step reports, on its own cadence: the console's progress every step; a metrics record at the
    first step of this launch, every log.every, the last, a skipped step and an evaluated one. Collective
    where it logs (the peak memory is agreed over ranks), so every rank calls it; rank 0 writes."""

    def __init__(self, cfg: Config, first: int, last: int, device: torch.device, writes: bool) -> None:
        self.first, self.last, self.every, self.total, self.device = first, last, cfg.log.every, cfg.train.steps, device
        self.logger = MetricsLogger(cfg.run_dir, total_steps=cfg.train.steps, first_step=first,
                                    tensorboard=cfg.log.tensorboard, progress=cfg.log.progress) if writes else None

    def after_step(self, step: int, result: StepResult, lr: float, step_time_s: float,
                   predicted_step_s: Optional[float], evaluated: bool, extra: Callable[[], dict[str, Any]]) -> None:
        """`extra()`: the record's other fields (data, evaluation, skipped steps), asked for only when logged."""
        if self.logger is not None:
            self.logger.progress(result, result.tokens / step_time_s)
        if not (step == self.first + 1 or step % self.every == 0 or step == self.last or result.skipped or evaluated):
            return
        peak_gb = peak_memory_gb(self.device)  # collective: every rank decides alike to log this step
        if self.logger is not None:
            record = step_record(step, result, lr, step_time_s, predicted_step_s)
            self.logger.log({**record, "peak_memory_gb": peak_gb, **extra()}, self.total)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
