"""Weights-only checkpoints: what `moeyard convert` writes and what `--init` starts a run from.

The same folder format as a training checkpoint (DCP shards + manifest.json with sizes and sha256), with
only the `model` (and router `buffers`) entries, step 0 and `"kind": "weights"`. Expert weights are
global [E, ...] tensors, so `--init` loads them at any world size and ep. `--init` also accepts a
training run's checkpoint: it then takes the weights and leaves optimizer state, step and RNG behind.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex

from moeyard.errors import CheckpointError, ConfigError
from moeyard.models import ModelConfig, build_model
from moeyard.trainer.checkpoint import safe_read
from moeyard.trainer.checkpoint.store import MANIFEST, base_of, read_manifest, sha256, verify, write_durably
from moeyard.trainer.config.sections import Config, to_dict


class _StreamingPlanner(DefaultSavePlanner):
    """Plans from the tensors' shapes (meta tensors will do) and makes each model tensor only when DCP
    writes it, so a conversion holds one tensor at a time."""

    def __init__(self, produce: Callable[[str], Tensor]) -> None:
        super().__init__()
        self.produce = produce

    def lookup_object(self, index: MetadataIndex) -> Any:
        section, _, name = index.fqn.partition(".")
        if section != "model":
            return super().lookup_object(index)
        planned, made = super().lookup_object(index), self.produce(name)
        if made.shape != planned.shape or made.dtype != planned.dtype:  # the metadata says `planned`
            raise ConfigError(f"converting {name} made {tuple(made.shape)} {made.dtype}, where the checkpoint "
                              f"was planned with {tuple(planned.shape)} {planned.dtype}")
        return made.contiguous()


def write_weights_checkpoint(state: dict[str, Tensor], model_cfg: ModelConfig, out: Path,
                             source: dict[str, Any], buffers: dict[str, Tensor] | None = None,
                             produce: Callable[[str], Tensor] | None = None) -> Path:
    """Check `state` against the model `model_cfg` builds, then write it (and router `buffers`, when the
    model has any) to `out` (a new folder) atomically. With `produce`, `state` gives only the shapes (meta
    tensors) and `produce(name)` makes each tensor as it is written."""
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new folder for the checkpoint")
    with torch.device("meta"):
        model = build_model(model_cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n}: {tuple(state[n].shape)} != {tuple(s)}" for n, s in expected.items()
             if n in state and state[n].shape != s]
    model_buffers = {n: b.shape for n, b in model.named_buffers()}
    extra += sorted(n for n in buffers or {} if n not in model_buffers)
    wrong += [f"{n}: {tuple(b.shape)} != {tuple(model_buffers[n])}" for n, b in (buffers or {}).items()
              if n in model_buffers and b.shape != model_buffers[n]]
    if missing or extra or wrong:
        raise ConfigError(f"converted weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                          f"wrong shapes {wrong[:3]}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():  # DCP warns that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        saved = {"model": {n: t.contiguous() for n, t in state.items()}}
        if buffers:
            saved["buffers"] = {n: t.contiguous() for n, t in buffers.items()}
        if produce is None:
            dcp.save(saved, checkpoint_id=tmp, no_dist=True)
        else:  # one file per tensor: DCP's writer keeps every tensor of a file until the file is complete
            dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=False), no_dist=True,
                     planner=_StreamingPlanner(produce))
    files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())]
    manifest = {"kind": "weights", "step": 0, "samples": 0, "config_hash": "", "world_size": 1, "ep": 1,
                "config": to_dict(Config(model=model_cfg)), "source": source, "files": files}
    write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out


class CheckpointTensors:
    """A checkpoint's model tensors, read one at a time (DCP reads only that tensor's bytes); a
    trainable-only checkpoint's frozen tensors come from its base. The caller checks the files first
    (`store.verify`)."""

    def __init__(self, path: Path) -> None:
        self.chain: list[tuple[Path, Any]] = []
        while path is not None:
            if self.chain:  # a base: its content hash was checked by base_of, its files are here
                verify(path)
            self.chain.append((path, safe_read.read_metadata(path).state_dict_metadata))
            path = base_of(read_manifest(path), path)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The global shape `.metadata` records for parameter (or buffer) `name`, None where none does."""
        for _, meta in self.chain:
            for kind in ("model", "buffers"):
                entry = meta.get(f"{kind}.{name}")
                if entry is not None and hasattr(entry, "size"):
                    return tuple(entry.size)
        return None

    def check_shapes(self, model_cfg: ModelConfig) -> None:
        """Before a model is built from a manifest's config: every parameter that config makes has that shape
        in the checkpoint's `.metadata` (whose bytes the manifest vouches for), so an edited config (a vocabulary
        of 3 million) is refused by name instead of allocating gigabytes first."""
        with torch.device("meta"):
            model = build_model(model_cfg)
        wrong = [(name, tuple(p.shape), self.shape(name)) for name, p in model.named_parameters()
                 if self.shape(name) != tuple(p.shape) and ".adapter" not in name]
        if wrong:
            name, expected, found = wrong[0]
            held = "no such tensor" if found is None else list(found)
            raise CheckpointError(f"{self.chain[0][0]}: the manifest's model config makes {name} {list(expected)}, but "
                                  f"the checkpoint's files hold {held} ({len(wrong)} tensors differ): the "
                                  f"manifest was edited or belongs to another checkpoint")

    def read(self, name: str, like: Tensor) -> Tensor:
        """The tensor `name`, shaped and typed as `like` (a meta tensor will do)."""
        for path, meta in self.chain:
            for kind in ("model", "buffers"):  # a parameter, or a router buffer
                if f"{kind}.{name}" in meta:
                    out = torch.empty(like.shape, dtype=like.dtype)
                    safe_read.load({kind: {name: out}}, path)
                    return out
        raise CheckpointError(f"{self.chain[0][0]} (and its base) hold no tensor {name}")
