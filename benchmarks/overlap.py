"""Schedule off vs the planner's plan, side by side in one run, on this machine.

For each process count, trains the same config twice through `moeyard train`
(schedule.mode=off with predictions on, then schedule.mode=auto), and reports
the measured step time (median after warm-up), the exposed communication
(measured step time minus the compute the profiler timed in isolation), and the
planner's predicted step time next to the measured one.

    python benchmarks/overlap.py                      # CPU/gloo, 2 and 4 processes
    python benchmarks/overlap.py --nproc 8 --set train.global_batch_tokens=262144   # one GPU node

Targets (issue 4): the plan is never slower than off; predictions within 20%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(config: str, nproc: int, run_dir: Path, cache: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "moeyard", "train", config, "--nproc", str(nproc),
           "--set", f"run.dir={run_dir}", "--set", f"parallel.ep={nproc}", "--set", "log.every=1",
           "--set", "log.tensorboard=false", "--set", "checkpoint.every=0"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "MOEYARD_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compute_only(cache: Path, metrics: list[dict], nproc: int) -> float:
    """Seconds of pure compute per step, from the profile this run measured (same shapes, no communication)."""
    (profile_path,) = (cache / "profiles").glob("profile-*.json")
    p = json.loads(profile_path.read_text())
    load = metrics[-1]["expert_load"]
    rows_per_rank = sum(next(iter(load.values()))) / nproc
    experts = sum(p[k][0] + p[k][1] * rows_per_rank for k in ("experts_fwd", "experts_bwd"))
    return p["dense_fwd_s"] + p["dense_bwd_s"] + len(load) * experts + p["optimizer_s"]


def plan_text(run_dir: Path) -> str:
    plan = json.loads((run_dir / "plan.json").read_text())
    overlap = "overlapped" if plan["overlap_grads"] else "after backward"
    return f"r={plan['chunks']}, {len(plan['dense_buckets'])}+{len(plan['expert_buckets'])} buckets {overlap}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--manual-chunks", type=int, nargs="*", default=[2, 4],
                        help="also run these fixed pipeline degrees (with 1 MiB buckets) for comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print("| processes | schedule | plan | measured step | predicted step | prediction error | exposed comm |")
    print("|---|---|---|---|---|---|---|")
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            measured = {}
            schedules = {"off": ["schedule.mode=off"], "auto": ["schedule.mode=auto"]}
            for r in args.manual_chunks:  # pipelined plans the planner did not pick: is the model right there too?
                schedules[f"manual r={r}"] = ["schedule.mode=manual", f"schedule.chunks={r}", "schedule.bucket_mb=1"]
            for mode, schedule in schedules.items():
                run_dir = Path(tmp) / mode.replace(" ", "_").replace("=", "")
                metrics = train(args.config, nproc, run_dir, cache,
                                [f"train.steps={args.steps}", "schedule.predict=true", *schedule, *args.overrides])
                measured[mode] = statistics.median(m["step_time_s"] for m in metrics[args.warmup:])
                predicted = metrics[-1]["predicted_step_s"]
                exposed = max(0.0, measured[mode] - compute_only(cache, metrics, nproc))
                print(f"| {nproc} | {mode} | {plan_text(run_dir)} | {measured[mode] * 1e3:.1f} ms | "
                      f"{predicted * 1e3:.1f} ms | {100 * (predicted - measured[mode]) / measured[mode]:+.1f}% | "
                      f"{exposed * 1e3:.1f} ms |", flush=True)
            print(f"| {nproc} | plan / off | | {measured['auto'] / measured['off']:.3f}x | | | |", flush=True)


if __name__ == "__main__":
    main()
