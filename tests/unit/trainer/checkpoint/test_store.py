"""The checkpoints folder: completeness, verification, retention -- on hand-made folders."""
from __future__ import annotations

import json

import pytest

from moeyard.errors import CheckpointError
from moeyard.trainer.checkpoint.store import CheckpointStore, sha256, verify


def make(root, step: int, payload: bytes = b"weights") -> None:
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"index")
    (folder / "__0_0.distcp").write_bytes(payload)
    files = [{"name": name, "bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
             for name in (".metadata", "__0_0.distcp")]
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
    CheckpointStore(tmp_path).prune(keep_last=2, keep_every=500, current=1000)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_000500", "step_000900", "step_001000"]


def test_resuming_from_an_older_step_sets_newer_ones_aside_and_pruning_spares_the_new_timeline(tmp_path) -> None:
    for step in (100, 200, 400):
        make(tmp_path, step)
    store = CheckpointStore(tmp_path)
    moved = store.set_aside_newer_than(100)  # rolled back to step 100 (or 200 and 400 were damaged)
    assert sorted(p.name for p in moved) == [".abandoned_step_000200", ".abandoned_step_000400"]
    make(tmp_path, 110)
    store.prune(keep_last=1, keep_every=0, current=110)
    assert [s for s, _ in store.complete()] == [110]
    assert store.newest_intact().path == tmp_path / "step_000110"
    assert (tmp_path / ".abandoned_step_000400" / "manifest.json").is_file()  # nothing deleted


def test_republishing_a_step_replaces_it_without_a_gap(tmp_path) -> None:
    make(tmp_path, 5, b"old")
    tmp = tmp_path / ".step_000005.tmp"
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"index")
    (tmp / "__0_0.distcp").write_bytes(b"new")
    files = [{"name": name, "bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
             for name in (".metadata", "__0_0.distcp")]
    CheckpointStore(tmp_path).publish(tmp, 5, {"step": 5, "files": files})
    assert (tmp_path / "step_000005" / "__0_0.distcp").read_bytes() == b"new"
    assert verify(tmp_path / "step_000005")["step"] == 5
    assert (tmp_path / "latest").read_text().strip() == "step_000005"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000005"]


def test_metrics_cut_short_by_a_crash_do_not_block_a_restart(tmp_path) -> None:
    from moeyard.trainer.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    MetricsLogger(tmp_path, total_steps=5, first_step=2, tensorboard=False, progress=False).close()
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'


@pytest.mark.parametrize("listed", [[], [".metadata"]], ids=["empty", "a-shard-left-out"])
def test_a_manifest_vouches_for_every_file_a_load_reads(tmp_path, listed) -> None:
    """Issue 35 item 8: `"files": []` over a bit-flipped shard used to pass as intact, and a shard that
    `.metadata` names but the manifest leaves out was read unchecked. Now both are refused by name."""
    make(tmp_path, 10)
    folder = tmp_path / "step_000010"
    (folder / "__0_0.distcp").write_bytes(b"weightz")  # damaged, and no longer vouched for
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["name"] in listed]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not list .metadata" if not listed else "not listed in the manifest"):
        verify(folder)
    assert CheckpointStore(tmp_path).newest_intact().path is None
