"""The CLI refuses a bad config or a corpus the model cannot embed before any worker starts (the launcher's
decisions run in this process: tests/unit/launch/test_cli.py checks that a refusal imports no worker code)."""
from __future__ import annotations

import subprocess

import pytest
from helpers.runs import cli_in_process, moeyard_train, write_config

from moeyard import configs


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`moeyard train *args` up to where it refuses, in this process (helpers.runs.cli_in_process)."""
    return cli_in_process(["train", *args], tmp_path, {"OMP_NUM_THREADS": "1",
                                                       "MOEYARD_CACHE": str(tmp_path / "cache")})


def test_vocab_too_small_for_the_corpus_fails_before_any_worker(tmp_path, small_corpus) -> None:
    proc = _train(tmp_path, "--set", f"run.dir={tmp_path}/run", "--set", "model.vocab_size=200", "--set",
                  f"data.dir={small_corpus}")
    assert proc.returncode == 2
    assert "model.vocab_size=200 is smaller than the 257 token ids" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_rejects_bad_config_before_starting_workers(tmp_path) -> None:
    """Exit code 2 and a one-line message; no run directory, no torchrun."""
    proc = _train(tmp_path, "--nproc", "3", "--set", f"run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "world size 3 is not a multiple of parallel.ep=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_this_machine_is_refused_before_any_worker(tmp_path, small_corpus) -> None:
    """Mixtral-8x7B's shape on 2 CPU processes: hundreds of GB per rank predicted against this host's
    memory; exit code 2, the numbers and the way out, no run directory."""
    proc = _train(tmp_path, str(configs.path("published/mixtral-8x7b.yaml")), "--nproc", "2", "--set",
                  f"run.dir={tmp_path}/run", "--set", "parallel.ep=2", "--set", f"data.dir={small_corpus}")
    assert proc.returncode == 2, proc.stderr
    assert "GB predicted peak" in proc.stderr and "does not fit this host's available memory" in proc.stderr
    assert "schedule.memory_check=false" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_resume_that_would_change_shapes_is_refused_before_workers_and_config_yaml_is_kept(
        tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 2})
    moeyard_train(config, tmp_path / "run", 2, "parallel.ep=2")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    proc = _train(tmp_path, str(config), "--nproc", "2", "--set", f"run.dir={tmp_path / 'run'}", "--set",
                  "train.steps=4", "--set", "model.dim=32")
    assert proc.returncode == 2, proc.stderr
    assert "resuming" in proc.stderr and "model.tok_embeddings.weight is (264, 64) there" in proc.stderr
    assert "(264, 32)" in proc.stderr and "Traceback" not in proc.stderr
    assert "training " not in proc.stdout, "workers were started"
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_a_corpus_smaller_than_one_batch_is_refused_before_workers(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"global_batch_tokens": 2 ** 24},
                          schedule={"memory_check": False})  # the memory check would refuse such a batch too
    proc = _train(tmp_path, str(config), "--nproc", "2", "--set", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert "fewer than one global batch (524288)" in proc.stderr and "Traceback" not in proc.stderr
    assert "training " not in proc.stdout


def test_a_config_that_is_not_utf8_is_one_line(tmp_path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    proc = _train(tmp_path, str(tmp_path / "c.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file {tmp_path / 'c.yaml'} is not UTF-8 text (byte 16): save it " \
                                  f"as UTF-8"


def test_a_read_only_run_dir_is_refused_before_workers(tmp_path, small_corpus) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        config = write_config(tmp_path / "c.yaml", small_corpus)
        proc = _train(tmp_path, str(config), "--nproc", "2", "--set", f"run.dir={target / 'run'}")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert proc.returncode == 2, proc.stderr
    assert f"run.dir {target / 'run'} cannot be created (Read-only file system)" in proc.stderr
    assert "Traceback" not in proc.stderr
