"""The layer benchmark runs end to end on tiny shapes and its equivalence check holds (seconds, no timing
claims: speed is reported by the benchmark itself, never asserted in a unit test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from moeyard.trainer.checkpoint.store import verify


def test_moe_layer_benchmark_smoke(tmp_path: Path) -> None:
    stem = tmp_path / "layer"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "moe_layer.py"), "--smoke", "--out", str(stem),
                           "--timeout", "240"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    (entry, *_) = report["entries"]
    assert entry["world"] == 2 and entry["tokens"] == 256
    assert entry["floor_ms"] > 0 and entry["moeyard_off_ms"] > 0
    assert set(entry["ratio_to_floor"]) >= {"moeyard_off", "moeyard_planned"}
    errors = entry["max_rel_error_vs_reference"]
    assert "moeyard_off" in errors and all(e <= 1e-4 for e in errors.values()), errors
    if "deepspeed_ms" in entry:  # DeepSpeed installed: it must compute the same layer too
        assert "deepspeed_dropless" in errors and entry["speedup_vs_deepspeed"] > 0
    assert "| 2 | 256 | 4 |" in stem.with_suffix(".md").read_text()


def test_memory_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/memory.py on a tiny model, replicated and fsdp: it measures every rank and writes its
    table; the state it counts from the tensors is what 16 bytes a parameter predicts for fsdp."""
    stem = tmp_path / "memory"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--smoke", "--out", str(stem)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(stem.with_suffix(".json").read_text())["calibration"]
    assert [r["layout"].split(",")[0] for r in rows] == ["replicated", "fsdp"]
    assert all(r["train_peak"] > 0 and r["predicted_peak"] > 0 and r["step_s"] > 0 for r in rows)
    # The tensors' peak is the resident peak less what the process holds that is no tensor (code, heaps)
    assert all(0 < r["tensor_peak"] < r["train_peak"] and r["runtime"] > 0 for r in rows)
    fsdp = rows[1]
    assert abs(fsdp["state"] / fsdp["predicted_state"] - 1) < 0.05, fsdp
    assert "fsdp / replicated step time" in stem.with_suffix(".md").read_text()


def test_soak_smoke_survives_repeated_kills_bit_exact(tmp_path: Path) -> None:
    """benchmarks/soak.py's short form: 2 ranks, a random worker SIGKILLed twice under --max-restarts;
    the run ends at the uninterrupted run's losses, bit for bit, with its last checkpoint intact and the
    checkpoints' disk bounded by keep_last."""
    stem = tmp_path / "soak"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--ranks", "2", "--steps", "40",
                           "--every", "5", "--kills", "2", "--wait", "0.2", "0.6", "--dir", str(tmp_path / "runs"),
                           "--out", str(stem), "--timeout", "240"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "MOEYARD_CACHE":
                                                                            str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["kills"] == report["kills_survived"] == 2, report
    assert report["losses_bit_exact"] and report["steps_logged"] == 40, report
    assert report["steps_recomputed"] >= 0 and all(r % 5 == 0 for r in report["resumed_at_step"]), report
    final = tmp_path / "runs" / "chaos" / "checkpoints" / "step_000040"
    assert verify(final)["step"] == 40 and (final.parent / "latest").read_text().strip() == final.name
    one = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    # keep_last complete ones, the one being written, and at most one half-written by a killed save
    assert one <= report["disk_high_water_bytes"] <= (report["keep_last"] + 2) * one * 1.05, (one, report)


def test_gpu_check_script_smoke_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --smoke --gpus 2: every step of the device check runs and passes on CPU, the
    multi-GPU ones on 2 gloo ranks (grouped-GEMM probe with empty experts, the layer benchmark, a stopped
    and resumed train, plain vs fsdp, the attention paths, FP8 against the compute dtype; the exchange against
    the one-device layer, fsdp memory per rank, the pipelined exchange), moeyard taken from the clone without
    pip, within the budget; the report names each step's verdict."""
    report = tmp_path / "gpu_check.md"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--gpus", "2", "--budget",
                           "300", "--report", str(report)], capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + report.read_text()[-4000:]
    text = report.read_text()
    for title in ("1. grouped-GEMM probe", "2a. host syncs", "2c. FP8 GEMMs", "3. Mixtral-shaped", "4. moeyard train",
                  "5. peak memory", "6. attention paths", "7. 2 ranks: NCCL all-to-all", "8. 2 ranks: peak memory",
                  "9. 2 ranks: pipelined exchange"):
        assert f"## {title}" in text and text.split(f"## {title}")[1].split("\n")[0].count(": PASS") == 1, title
    assert '"empty_experts_zero_grad": true' in text and "steps logged: 1 .. 4" in text
    assert "parallel.fsdp=false: peak_memory_gb" in text and "parallel.fsdp=true: peak_memory_gb" in text
    assert '"hierarchical r=2": ' in text and '"sinks_window": {"kernel": "attention (sinks/window)' in text
    # Step 3 is benchmarks/moe_layer_gpu.py (also benchmarks/gpu.sh's): the moeyard rows, the peers reported
    # even when absent, and in the smoke its MFU run (a real `moeyard train`); its JSON is the step's last line.
    layer = json.loads(text.split("## 3. Mixtral-shaped")[1].split("```")[1].strip().splitlines()[-1])
    rows = {r["system"]: r for r in layer["layers"]}
    assert len(rows) == 4 and all("ms" in r or r["unavailable"] for r in rows.values())
    for name in ("moeyard experts (grouped GEMM)", "moeyard MoE layer"):
        assert rows[name]["ms"] > 0 and rows[name]["pct_of_dense_gemm"] > 0
    training = layer["training"]
    assert training["step_s"] > 0 and training["tokens_per_step"] == 256 and training["steps_timed"] >= 2
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in text.splitlines() if "(limit " in line]
    assert len(limits) == 10 and sum(limits) <= 300, limits
    assert '"linear": {"float32_ms": ' in text  # the FP8 probe's timings, float32 on a CPU
