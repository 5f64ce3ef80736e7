"""Run `moeyard train` as a user would, in a subprocess with a timeout, and read what it wrote."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moeyard.models import build_model
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.config.sections import Config, read_config

# A model small enough for 4 CPU processes on 2 cores, with every MoE feature switched on.
SMALL = {
    "run": {"name": "small", "seed": 7},
    "model": {"vocab_size": 264, "dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
              "max_seq_len": 32,
              "moe": {"num_experts": 8, "top_k": 2, "ffn_dim": 64, "first_dense_layers": 1,
                      "num_shared_experts": 1, "aux_loss_coef": 0.01, "z_loss_coef": 0.001}},
    "train": {"steps": 6, "global_batch_tokens": 512, "seq_len": 32, "grad_clip": 1.0},
    "optim": {"lr": 1.0e-2, "min_lr": 1.0e-3, "warmup_steps": 2},
    "log": {"every": 1, "tensorboard": False, "progress": False},
    "checkpoint": {"every": 0},
}


def write_config(path: Path, corpus: Path, **sections: dict[str, Any]) -> Path:
    tree = json.loads(json.dumps(SMALL))
    tree["data"] = {"dir": str(corpus)}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def run_moeyard_train(config: Path, run_dir: Path, nproc: int, *overrides: str,
                      timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`moeyard train` as a user runs it, whatever its exit code."""
    cmd = [sys.executable, "-m", "moeyard", "train", str(config), "--nproc", str(nproc),
           "--set", f"run.dir={run_dir}", "--set", "parallel.timeout_s=120"]
    for assignment in overrides:
        cmd += ["--set", assignment]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MOEYARD_CACHE": str(run_dir.parent / "cache")}  # profiles measured fresh, never from a user's cache
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s:\n{err.stderr}") from None


def moeyard_train(config: Path, run_dir: Path, nproc: int, *overrides: str,
                  timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`moeyard train` that must succeed."""
    proc = run_moeyard_train(config, run_dir, nproc, *overrides, timeout_s=timeout_s)
    assert proc.returncode == 0, f"`{' '.join(proc.args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _workers_would_start(*args: Any, **kwargs: Any) -> int:
    raise AssertionError("cli_in_process: the command passed every launcher check and would start workers; "
                         "run it as a subprocess (run_moeyard_train) instead")


def cli_in_process(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`moeyard *argv` called in this process, for what the command decides before any worker starts (a
    refusal, a rendered job script): the same code and output as a subprocess without its seconds of imports.
    Starting workers (or a one-process run in this process) fails the call instead. `env` is added to the
    environment for the call; the environment and working directory are restored."""
    from moeyard.launch.cli import main
    from moeyard.launch.commands import plan, train

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    stubbed = [(module, name, getattr(module, name)) for module in (train, plan)
               for name in ("launch_workers", "run_worker")]
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(cwd)
    for module, name, _ in stubbed:
        setattr(module, name, _workers_would_start)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's refusals
                code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for module, name, original in stubbed:
            setattr(module, name, original)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["moeyard", *argv], code, out.getvalue(), err.getvalue())


def _train_rank(rank: int, world: int, cfg: Config, cache: str, logs: str) -> dict[str, Any]:
    """One rank of `train_forked`: the worker's training call, its output kept in logs/rank<r>.log."""
    from moeyard.trainer.loop import run_training

    os.environ["MOEYARD_CACHE"] = cache
    log = Path(logs) / f"rank{rank}.log"
    saved = os.dup(1), os.dup(2)
    with log.open("w") as out:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            outcome = run_training(cfg, torch.device("cpu"))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return {"step": outcome.step, "signal": outcome.signal, "stdout": log.read_text()}


def train_forked(config: Path, run_dir: Path, nproc: int, *overrides: str,
                 timeout_s: float = 300) -> subprocess.CompletedProcess:
    """The run `moeyard_train` makes, without the launcher around it: the config resolved as `moeyard train`
    resolves it, then `nproc` workers forked from the tests' fork server (torch and moeyard imported once)
    train in a gloo group. For what the CLI and the launcher add nothing to: what a run learns, what it
    saves and resumes. Returns rank 0's output as a completed process's stdout."""
    from helpers.multiprocess import run_distributed
    from moeyard.trainer.config.resolve import machines_of, resolve_run

    cfg = resolve_run(config, [f"run.dir={run_dir}", "parallel.timeout_s=120", *overrides],
                      machines_of(nproc, nproc))
    logs = run_dir.parent / f"{run_dir.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ranks = run_distributed(_train_rank, nproc, cfg, str(run_dir.parent / "cache"), str(logs), timeout_s=timeout_s)
    return subprocess.CompletedProcess(["train_forked", str(config), *overrides], 0, ranks[0]["stdout"], "")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_parameters(run_dir: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The last checkpoint's weights gathered into one unsharded model."""
    cfg = read_config(run_dir / "config.yaml")
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    model = build_model(cfg.model)
    load_full_model(run_dir / "checkpoints" / step, model)
    return cfg, {name: p.detach().clone() for name, p in model.named_parameters()}


def initial_parameters(cfg: Config) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.run.seed)
    return {name: p.detach().clone() for name, p in build_model(cfg.model).named_parameters()}


def skip_or_fail(reason: str) -> None:
    """A launcher missing on a developer's machine skips; in CI (MOEYARD_REQUIRE_LAUNCHERS=1) it fails."""
    if os.environ.get("MOEYARD_REQUIRE_LAUNCHERS") == "1":
        pytest.fail(f"MOEYARD_REQUIRE_LAUNCHERS=1 but {reason}")
    pytest.skip(reason)


RTOL = 1e-5
"""How close two layouts of the same run must be (losses, grad norms, parameter updates)."""


def assert_same_run(ref_dir, run_dir, label: str, update_rtol: float = RTOL) -> None:
    """Two runs learned the same: losses and grad norms within RTOL, the same routing, and parameter updates
    within `update_rtol` relative (norm-wise per tensor; RTOL unless a test states why not)."""
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(got, ref):
        assert ("mtp_loss" in a) == ("mtp_loss" in b), f"{label} step {a['step']}: mtp_loss in one run only"
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm") + (("mtp_loss",) if "mtp_loss" in b else ()):
            assert a[key] == pytest.approx(b[key], rel=RTOL), f"{label} step {a['step']} {key}"
        assert a["expert_load"] == b["expert_load"], f"{label} step {a['step']} routed differently"
    cfg, final_ref = final_parameters(ref_dir)
    _, final_got = final_parameters(run_dir)
    init = initial_parameters(cfg)
    for name, p0 in init.items():
        update_ref, update_got = final_ref[name] - p0, final_got[name] - p0
        assert update_ref.norm() > 0, f"{name} did not train: the comparison would prove nothing"
        rel = (update_got - update_ref).norm() / update_ref.norm()
        assert rel < update_rtol, f"{label}: update of {name} differs by {rel:.2e} (relative)"
