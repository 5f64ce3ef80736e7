"""Checkpoints crafted to attack the reader: a real checkpoint whose `.metadata` is a pickle that runs a
shell command when unpickled, with a manifest that lists its true size and sha256 (so every file check
passes and only the reader stands between the file and the machine)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

from helpers import FIXTURES
from moeyard.trainer.checkpoint.store import sha256

REAL = FIXTURES / "checkpoint_before_restructure" / "step_000002"


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_consistent_manifest(folder: Path) -> None:
    """List every file of `folder` with its real size and sha256, as an attacker would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)}
                         for p in sorted(folder.iterdir()) if p.name != "manifest.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def malicious_checkpoint(target: Path, marker: Path, payload: object = None) -> Path:
    """A copy of a real checkpoint at `target` whose metadata, if unpickled, creates `marker` (or is
    `payload` pickled, when given)."""
    shutil.copytree(REAL, target)
    payload = _RunsCommand(f"touch {marker}") if payload is None else payload
    (target / ".metadata").write_bytes(pickle.dumps(payload))
    write_consistent_manifest(target)
    return target
