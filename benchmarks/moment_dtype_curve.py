"""What bf16 AdamW moments cost in loss: the embedded demo (`moeyard train`, 300 steps, 2 CPU ranks) with
optim.moment_dtype float32 and bfloat16, side by side.

    python benchmarks/moment_dtype_curve.py               # two runs of ~6 min on 2 cores, then the table
    python benchmarks/moment_dtype_curve.py --runs DIR    # the table from DIR/float32 and DIR/bfloat16

Writes benchmarks/results/moment_dtype_curve.md: the mean training loss over each hundred steps (logged every
10) and over the last 50, and the difference. One seed: the run-to-run noise of this demo is not measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "moment_dtype_curve.md"
DTYPES = ("float32", "bfloat16")
WINDOWS = ((1, 100), (101, 200), (201, 300), (251, 300))


def train(run_dir: Path, dtype: str) -> None:
    cmd = [sys.executable, "-m", "moeyard", "train", "--set", f"run.dir={run_dir}",
           "--set", f"optim.moment_dtype={dtype}"]
    subprocess.run(cmd, check=True, timeout=3600)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def table(runs: Path) -> str:
    curves = {dtype: losses(runs / dtype) for dtype in DTYPES}
    lines = ["| steps | float32 moments | bfloat16 moments | difference |", "|---|---|---|---|"]
    for lo, hi in WINDOWS:
        means = [statistics.mean(v for s, v in curves[d].items() if lo <= s <= hi) for d in DTYPES]
        lines.append(f"| {lo}-{hi} | {means[0]:.4f} | {means[1]:.4f} | {means[1] - means[0]:+.4f} "
                     f"({(means[1] - means[0]) / means[0]:+.2%}) |")
    last = max(curves["float32"])
    lines.append(f"| {last} (last) | {curves['float32'][last]:.4f} | {curves['bfloat16'][last]:.4f} | "
                 f"{curves['bfloat16'][last] - curves['float32'][last]:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, help="read the two runs from here instead of training them")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    runs = args.runs
    if runs is None:
        runs = Path(tempfile.mkdtemp(prefix="moment_dtype_"))
        for dtype in DTYPES:
            train(runs / dtype, dtype)
    text = table(runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"`python benchmarks/moment_dtype_curve.py`, {time.strftime('%Y-%m-%d')}: the demo "
                        f"(configs/tiny.yaml), 300 steps, 2 CPU ranks, mean training loss\n\n{text}\n")


if __name__ == "__main__":
    main()
