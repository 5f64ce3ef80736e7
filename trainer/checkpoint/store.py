"""The checkpoints folder of a run: which checkpoints are complete and intact, and which to keep.

    run_dir/checkpoints/
      step_000100/        complete: has manifest.json, every listed file with its size and sha256
      .step_000200.tmp/   being written (or left by a crash): never loaded, removed on the next save
      latest              names the newest complete checkpoint; moved only after a rename

Pure file-system logic, no process groups: the trainer calls it on rank 0 and
broadcasts the verdict.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeyard.errors import CheckpointError

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{6,})$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path} is not a complete moeyard checkpoint: no {MANIFEST}")
    try:
        return json.loads(manifest.read_text())
    except ValueError as err:
        raise CheckpointError(f"{manifest} is not valid JSON: {err}") from None


def is_plain_name(name: object) -> bool:
    """A file name that stays in its folder: no separator, not `.` or `..`, no NUL (which no path holds)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _outside(folder: Path, name: object) -> str | None:
    """Why the manifest's file `name` is not a file inside `folder` (a path, `..`, a link out), or None."""
    if not is_plain_name(name):
        return f"{folder}: the manifest lists a file {name!r}, which is not a plain name inside the checkpoint"
    if (folder / name).is_symlink():
        return f"{folder}: file {name} is a symbolic link; a checkpoint's files must be inside it"
    return None


def check_files(path: Path, entries: list[dict[str, Any]]) -> str | None:
    """What is wrong with these manifest entries' files (outside the folder, missing, wrong size, wrong
    sha256), or None. A name that would leave the folder is refused before anything is opened."""
    for entry in entries:
        problem = _outside(path, entry.get("name"))
        if problem:
            return problem
        f = path / entry["name"]
        if not f.is_file():
            return f"{path}: file {entry['name']} is missing"
        if f.stat().st_size != entry["bytes"]:
            return (f"{path}: file {entry['name']} has {f.stat().st_size} bytes, the manifest says "
                    f"{entry['bytes']} (truncated?)")
        if sha256(f) != entry["sha256"]:
            return f"{path}: file {entry['name']} does not match its sha256 (corrupted)"
    return None


def unlisted(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why the manifest does not vouch for everything a load reads, or None: it must list DCP's index
    (.metadata) and every other file in the folder -- a file it leaves out would be read unchecked (an empty
    list over a damaged shard, or a shard `.metadata` names that the list omits)."""
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        return f"{path}: the manifest's files must be a list of {{name, bytes, sha256}}"
    listed = {f.get("name") for f in files}
    if ".metadata" not in listed:
        return (f"{path}: the manifest does not list .metadata, so nothing in this checkpoint can be verified: "
                f"it was not written by moeyard, or its manifest was edited")
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in listed)
    if extra:
        return (f"{path}: {extra[:3]} {'are' if len(extra) > 1 else 'is'} not listed in the manifest, so "
                f"{'they' if len(extra) > 1 else 'it'} could be read unchecked: remove what does not belong to "
                f"the checkpoint, or restore its manifest")
    return None


def content_hash(manifest: dict[str, Any]) -> str:
    """A checkpoint's identity: the hash of its files' names and sha256 (not of its path or its manifest's
    other fields), so a copy elsewhere keeps it and any changed shard changes it."""
    files = sorted((f["name"], f["sha256"]) for f in manifest.get("files", []))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def base_of(manifest: dict[str, Any], path: Path) -> Path | None:
    """The base checkpoint a trainable-only checkpoint at `path` refers to, after checking that it is
    still there with the recorded content hash (its files are checked when they are loaded); None for a
    self-contained checkpoint."""
    base = manifest.get("base")
    if base is None:
        return None
    base_path = Path(base["path"])
    where = f"{path} holds only the weights that trained and needs its base checkpoint {base_path}"
    try:
        found = content_hash(read_manifest(base_path))
    except CheckpointError as err:
        raise CheckpointError(f"{where}, which cannot be read ({err}): put the base back at that path") from None
    if found != base["content_hash"]:
        raise CheckpointError(f"{where} with content hash {base['content_hash']}, but the checkpoint there now "
                              f"has {found}: it was replaced or changed. Put the original base back at that path")
    return base_path


def misnamed(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why a `step_N` folder does not hold step N's checkpoint (a copy or a link of another), or None."""
    m = _NAME.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return (f"{path}: the folder's name says step {int(m.group(1))} but its manifest says step "
                f"{manifest.get('step')} (a copy or a link of another checkpoint?); rename or remove it")
    return None


def latest_of(folder: Path) -> Path | None:
    """The checkpoint `folder/latest` names, which must be a step_N folder right inside `folder`; None
    without a `latest`."""
    marker = folder / "latest"
    if not marker.is_file():
        return None
    name = marker.read_text(errors="replace").strip()
    target = folder / name
    if not _NAME.match(name) or target.is_symlink():
        raise CheckpointError(f"{marker} names {name!r}, which is not a step_NNNNNN folder of {folder}: a "
                              f"`latest` may only name a checkpoint beside it. Give the checkpoint folder itself")
    return target


def verify(path: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is there, whole and unchanged."""
    manifest = read_manifest(path)
    problem = misnamed(path, manifest) or unlisted(path, manifest) or check_files(path, manifest["files"])
    if problem:
        raise CheckpointError(problem)
    return manifest


@dataclass(frozen=True)
class Found:
    path: Path | None
    """The newest intact checkpoint, or None."""
    skipped: tuple[str, ...]
    """Why newer ones were passed over, one message each."""


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def complete(self) -> list[tuple[int, Path]]:
        """Renamed checkpoint folders (complete by construction unless damaged later), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def newest_readable(self) -> Path | None:
        """The newest checkpoint whose manifest reads and matches its folder's name, without hashing its
        files: what a resume will most likely load (a damaged one is passed over later, for an older one
        of the same run)."""
        for _, path in reversed(self.complete()):
            try:
                if misnamed(path, read_manifest(path)) is None:
                    return path
            except CheckpointError:
                continue
        return None

    def newest_intact(self) -> Found:
        skipped = []
        for step, path in reversed(self.complete()):
            try:
                verify(path)
                return Found(path, tuple(skipped))
            except CheckpointError as err:
                skipped.append(str(err))
        return Found(None, tuple(skipped))

    def tmp_path(self, step: int) -> Path:
        return self.root / f".step_{step:06d}.tmp"

    def final_path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def publish(self, tmp: Path, step: int, manifest: dict[str, Any]) -> Path:
        """Write the manifest, rename into place, move `latest`: the checkpoint exists only once complete.

        A checkpoint of the same step already there is moved aside first and deleted only after the new
        one is in place, so no moment exists without an intact checkpoint of that step.
        """
        write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
        final = self.final_path(step)
        old = self.root / f".replaced_step_{step:06d}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        write_durably(self.root / ".latest.tmp", final.name + "\n")
        os.replace(self.root / ".latest.tmp", self.root / "latest")
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def set_aside_newer_than(self, step: int) -> list[Path]:
        """Resuming at `step` abandons later checkpoints (damaged ones passed over, or a timeline the user
        rolled back from): rename them `.abandoned_step_*` so that neither auto-resume nor pruning mixes
        them with the new timeline. Nothing is deleted."""
        moved = []
        for s, path in self.complete():
            if s > step:
                target = self.root / f".abandoned_{path.name}"
                shutil.rmtree(target, ignore_errors=True)
                os.replace(path, target)
                moved.append(target)
        return moved

    def prune(self, keep_last: int, keep_every: int, current: int) -> list[Path]:
        """Delete complete checkpoints older than the newest `keep_last` up to step `current` (the one just
        written is among them), sparing multiples of `keep_every`."""
        complete = [(s, p) for s, p in self.complete() if s <= current]
        removed = []
        for step, path in complete[:-keep_last] if keep_last > 0 else []:
            if keep_every and step % keep_every == 0:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        for leftover in self.root.glob(".step_*.tmp"):  # from a crash mid-save: never loadable
            shutil.rmtree(leftover, ignore_errors=True)
        return removed


def resolve_init(path: Path) -> Path:
    """A checkpoint folder, or a run's checkpoints folder (its `latest`), or a run folder."""
    for folder in (path, path / "checkpoints"):
        latest = latest_of(folder)
        if latest is not None:
            return latest
    return path
