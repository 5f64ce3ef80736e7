"""metrics.jsonl after a crash: a line torn by a kill mid-write, and the lines of steps after the checkpoint
a resume starts from, go; every other line stays as it was."""
from __future__ import annotations

import json

from moeyard.trainer.metrics import MetricsLogger


def test_resume_drops_a_torn_line_and_the_steps_it_reruns(tmp_path) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed mid-write
    logger = MetricsLogger(tmp_path, total_steps=10, first_step=5, tensorboard=False, progress=False)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:5]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_torn_line_before_the_resume_point_is_dropped_not_fatal(tmp_path) -> None:
    lines = [json.dumps({"step": s}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + '\n{"st\n' + lines[1] + "\n")
    MetricsLogger(tmp_path, total_steps=4, first_step=2, tensorboard=False, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines
