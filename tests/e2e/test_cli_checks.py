"""The CLI refuses a bad config or a corpus the model cannot embed before any worker starts."""
from __future__ import annotations

import subprocess
import sys

from moeyard import configs


def test_vocab_too_small_for_the_corpus_fails_before_any_worker(tmp_path, small_corpus) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moeyard", "train", "--set", f"run.dir={tmp_path}/run", "--set", "model.vocab_size=200",
         "--set", f"data.dir={small_corpus}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "model.vocab_size=200 is smaller than the 257 token ids" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_rejects_bad_config_before_starting_workers(tmp_path) -> None:
    """Exit code 2 and a one-line message; no run directory, no torchrun."""
    proc = subprocess.run(
        [sys.executable, "-m", "moeyard", "train", "--nproc", "3", "--set", f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "world size 3 is not a multiple of parallel.ep=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_this_machine_is_refused_before_any_worker(tmp_path, small_corpus) -> None:
    """Mixtral-8x7B's shape on 2 CPU processes: hundreds of GB per rank predicted against this host's
    memory; exit code 2, the numbers and the way out, no run directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "moeyard", "train", str(configs.path("published/mixtral-8x7b.yaml")), "--nproc", "2",
         "--set", f"run.dir={tmp_path}/run", "--set", "parallel.ep=2", "--set", f"data.dir={small_corpus}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "GB predicted peak" in proc.stderr and "does not fit this host's available memory" in proc.stderr
    assert "schedule.memory_check=false" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
