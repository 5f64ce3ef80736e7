"""The checkpoints folder: completeness, verification, retention -- on hand-made folders."""
from __future__ import annotations

import json

import pytest

from moeyard.trainer.checkpoint_store import CheckpointError, CheckpointStore, sha256, verify


def make(root, step: int, payload: bytes = b"weights") -> None:
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(payload)
    files = [{"name": "__0_0.distcp", "bytes": len(payload), "sha256": sha256(folder / "__0_0.distcp")}]
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files}))


def test_newest_intact_skips_damage_and_names_it(tmp_path) -> None:
    for step in (10, 20, 30):
        make(tmp_path, step)
    (tmp_path / "step_000030" / "__0_0.distcp").write_bytes(b"weightz")
    (tmp_path / "step_000020" / "manifest.json").unlink()
    (tmp_path / ".step_000040.tmp").mkdir()  # a save that never finished
    found = CheckpointStore(tmp_path).newest_intact()
    assert found.path == tmp_path / "step_000010"
    assert "step_000030" in found.skipped[0] and "sha256" in found.skipped[0]
    assert "step_000020" in found.skipped[1] and "no manifest.json" in found.skipped[1]
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify(tmp_path / "step_000030")


def test_prune_keeps_the_newest_and_every_kth_and_clears_leftovers(tmp_path) -> None:
    for step in range(100, 1100, 100):
        make(tmp_path, step)
    (tmp_path / ".step_001100.tmp").mkdir()
    CheckpointStore(tmp_path).prune(keep_last=2, keep_every=500)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_000500", "step_000900", "step_001000"]
