"""A checkpoint write that ran out of disk space, told as such.

torch reports a full disk in many forms: `OSError: [Errno 28] No space left on device`, or from its zip
writer `[enforce fail at inline_container.cc] unexpected pos`, wrapped by DCP in a CheckpointException
per rank. Whatever the form, the user needs one line: where, how much is needed and free, and that the
previous checkpoint is intact.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterator, Optional

from moeyard.errors import DiskFullError
from moeyard.trainer.checkpoint.store import CheckpointStore, read_manifest

_SIGNS = ("No space left", "unexpected pos", "ENOSPC", "Disk quota exceeded")


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> (exception, traceback)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                         if isinstance(f, BaseException)]


def _text(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 -- a __str__ that fails (DCP's, on odd tracebacks) hides nothing here
        return repr(e.args)


def _out_of_space(err: BaseException) -> bool:
    for e in _causes(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in _text(e) for sign in _SIGNS):
            return True
    return False


def checkpoint_bytes(store: CheckpointStore) -> Optional[int]:
    """The size of the newest complete checkpoint: what the next one needs, about."""
    for _, path in reversed(store.complete()):
        try:
            return sum(f["bytes"] for f in read_manifest(path).get("files", []))
        except Exception:  # noqa: BLE001 -- damaged: try an older one
            continue
    return None


def disk_full(err: BaseException, tmp: Path, step: int, store: CheckpointStore,
              estimate_bytes: int) -> Optional[DiskFullError]:
    """The one-line error for a save of `step` into `tmp` that failed with `err`, if the disk is full;
    None for any other failure."""
    free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else store.root).free
    need = checkpoint_bytes(store) or estimate_bytes
    if not _out_of_space(err) and free >= need:
        return None
    latest = store.root / "latest"
    kept = (f"the previous checkpoint {latest.read_text().strip()} is intact and still `latest`"
            if latest.is_file() else "no earlier checkpoint exists")
    return DiskFullError(f"no space left on the device of {store.root} writing checkpoint step {step}: it needs "
                         f"about {need / 1e9:.2f} GB and {free / 1e9:.2f} GB are free. The partial folder was "
                         f"removed and {kept}; free space (or lower checkpoint.keep_last) and run the same "
                         f"command to resume")
