"""Soak: a long `moeyard train` under --max-restarts while a chaos loop SIGKILLs a random worker.

What it reports (stdout, and --out as .json and .md): kills survived, steps recomputed (trained twice
because they came after the last checkpoint), the final loss against an uninterrupted run of the same
config (bit-exact on CPU), and the disk the checkpoints held at most (bounded by checkpoint.keep_last).

    python benchmarks/soak.py --ranks 4 --steps 3000 --out benchmarks/results/soak  # ~14 min on 2 cores
    python benchmarks/soak.py --ranks 2 --steps 40 --every 5 --kills 2 --wait 0.2 0.6  # the suite's form

Not a test: the suite runs the short form (tests/e2e/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from moeyard.launch.agent_watchdog import child_pids

MODEL = ["model.dim=64", "model.n_layers=3", "model.ffn_dim=128", "model.max_seq_len=64", "model.moe.ffn_dim=64",
         "train.seq_len=64", "train.global_batch_tokens=1024", "optim.warmup_steps=10", "log.every=1",
         "log.tensorboard=false", "log.progress=false"]


def train_command(run_dir: Path, ranks: int, steps: int, every: int, keep_last: int, restarts: int) -> list[str]:
    cmd = [sys.executable, "-m", "moeyard", "train", "--nproc", str(ranks), "--max-restarts", str(restarts)]
    for setting in [*MODEL, f"run.dir={run_dir}", f"parallel.ep={ranks}", f"train.steps={steps}",
                    f"checkpoint.every={every}", f"checkpoint.keep_last={keep_last}", "checkpoint.async_save=true",
                    "parallel.timeout_s=60"]:
        cmd += ["--set", setting]
    return cmd


def losses(run_dir: Path) -> list[float]:
    """The logged losses; a last line torn by a kill mid-write is not one."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line)["loss"])
        except (ValueError, KeyError):
            break
    return out


def workers(launcher: int) -> list[int]:
    """The launcher's running children that are training workers."""
    alive = []
    for pid in child_pids(launcher):
        try:
            if b"moeyard.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            continue
    return alive


def latest_step(run_dir: Path) -> int:
    """The step of the checkpoint a restart would resume from (0: none yet)."""
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def checkpoint_bytes(run_dir: Path) -> int:
    """Bytes under the run's checkpoints, read while the run writes, renames and rotates them: a folder or file
    gone before it is read counts nothing (os.walk skips a folder it cannot list; pathlib's rglob raised)."""
    total = 0
    for folder, _, files in os.walk(run_dir / "checkpoints"):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue  # renamed (a finished save) or removed by the rotation meanwhile
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def chaos(run_dir: Path, cmd: list[str], kills: int, wait: tuple[float, float], seed: int,
          timeout_s: float) -> dict:
    """Run `cmd`, SIGKILL a random worker `kills` times (each after `wait` seconds of progress)."""
    rng = random.Random(seed)
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline, high_water, killed_at, floor = time.monotonic() + timeout_s, 0, [], 0
    next_kill: Optional[float] = None
    try:
        while launcher.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: the run did not finish in {timeout_s:.0f} s; see {log.name}")
            high_water = max(high_water, checkpoint_bytes(run_dir))
            steps, alive = len(losses(run_dir)), workers(launcher.pid)
            # Armed once this round trained past the last kill and saved a checkpoint of its own (an async
            # save is published at the next one): every kill then has a resume to pair with.
            armed = steps > (killed_at[-1] if killed_at else 0) and latest_step(run_dir) > floor
            if len(killed_at) < kills and alive and armed:
                next_kill = next_kill or time.monotonic() + rng.uniform(*wait)
                if time.monotonic() >= next_kill:
                    os.kill(rng.choice(alive), signal.SIGKILL)
                    killed_at.append(steps)
                    floor, next_kill = latest_step(run_dir), None
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        log.close()
    text = Path(log.name).read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    return {"returncode": launcher.returncode, "killed_at_step": killed_at, "resumed_at_step": resumed,
            "steps_recomputed": sum(k - r for k, r in zip(killed_at, resumed)), "disk_high_water_bytes": high_water,
            "log": log.name}


def report(args: argparse.Namespace, reference: list[float], run: dict, got: list[float]) -> dict:
    return {"ranks": args.ranks, "steps": args.steps, "checkpoint_every": args.every, "keep_last": args.keep_last,
            "kills": len(run["killed_at_step"]), "kills_survived": len(run["resumed_at_step"]),
            "exit_code": run["returncode"], **{k: run[k] for k in ("killed_at_step", "resumed_at_step",
                                                                  "steps_recomputed", "disk_high_water_bytes")},
            "final_loss": got[-1] if got else None, "reference_final_loss": reference[-1],
            "losses_bit_exact": got == reference, "steps_logged": len(got)}


def markdown(r: dict) -> str:
    return ("| ranks | steps | kills survived | steps recomputed | final loss | uninterrupted | bit-exact | "
            "checkpoint disk high-water |\n|---|---|---|---|---|---|---|---|\n"
            f"| {r['ranks']} | {r['steps']} | {r['kills_survived']}/{r['kills']} | {r['steps_recomputed']} | "
            f"{r['final_loss']:.6f} | {r['reference_final_loss']:.6f} | {r['losses_bit_exact']} | "
            f"{r['disk_high_water_bytes'] / 2**20:.1f} MiB (keep_last={r['keep_last']}) |\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=25, help="checkpoint.every")
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--kills", type=int, default=None, help="default: until the run ends")
    parser.add_argument("--wait", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("runs/soak"))
    parser.add_argument("--out", type=Path, default=None, help="stem of the .json and .md report")
    parser.add_argument("--timeout", type=float, default=7200)
    args = parser.parse_args()
    if (args.dir / "chaos").exists() or (args.dir / "reference").exists():
        raise SystemExit(f"soak: {args.dir} holds an earlier soak; remove it or give --dir")
    args.dir.mkdir(parents=True, exist_ok=True)
    kills = args.kills if args.kills is not None else args.steps  # stops once the run ends
    start = time.monotonic()
    subprocess.run(train_command(args.dir / "reference", args.ranks, args.steps, args.every, args.keep_last, 0),
                   check=True, capture_output=True, timeout=args.timeout,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    reference_s = time.monotonic() - start
    cmd = train_command(args.dir / "chaos", args.ranks, args.steps, args.every, args.keep_last, kills + 1)
    run = chaos(args.dir / "chaos", cmd, kills, tuple(args.wait), args.seed, args.timeout)
    chaos_s = time.monotonic() - start - reference_s
    result = {**report(args, losses(args.dir / "reference"), run, losses(args.dir / "chaos")),
              "reference_seconds": round(reference_s, 1), "chaos_seconds": round(chaos_s, 1)}
    print(json.dumps(result, indent=1))
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    return 0 if result["exit_code"] == 0 and result["losses_bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
