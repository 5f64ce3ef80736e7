"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of one checkpoint, `run_dir/checkpoints/step_000100/`:
  *.distcp, .metadata   DCP shards: model and AdamW state (unsharded per parameter,
                        whether or not the optimizer ran ZeRO-sharded). Expert weights are one
                        global tensor [num_experts, ...] sharded on dim 0, so the
                        files do not depend on the ep/world layout that wrote them.
  manifest.json         step, config, world layout, plan, every file with size and sha256.
Every rank writes into `.step_000100.tmp`; when all are done rank 0 writes the
manifest and renames the folder, then moves `checkpoints/latest`. A folder
without a manifest is incomplete by construction. Nothing in it is pickled:
the non-tensor state lives in the JSON manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeyard.models import expert_modules
from moeyard.parallel import ParallelMesh
from moeyard.parallel.grad_sync import GradSync
from moeyard.parallel.plan import Plan

from .config import Config, to_dict

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expert_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in expert_modules(model) for p in m.parameters()}


def sharded_state_dict(model: nn.Module, sync: GradSync, pmesh: ParallelMesh) -> dict[str, Any]:
    """Model and AdamW state keyed by parameter name; expert shards wrapped as global DTensors."""
    expert_ids = _expert_param_ids(model)

    def globalize(t: Tensor, param: nn.Parameter) -> Tensor:
        if id(param) in expert_ids:
            # Replicated over edp, sharded over ep on dim 0: the global [E, ...] tensor.
            return DTensor.from_local(t.detach(), pmesh.mesh, [Replicate(), Shard(0)], run_check=False)
        return t.detach()

    model_sd = {name: globalize(p, p) for name, p in model.named_parameters()}
    optim_sd: dict[str, Any] = {}
    states = sync.param_states()
    for name, p in model.named_parameters():
        state = states.get(id(p))
        if state:
            optim_sd[name] = {k: globalize(v, p) if v.dim() > 0 else v.detach().clone() for k, v in state.items()}
    return {"model": model_sd, "optim": optim_sd}


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_files(folder: Path) -> list[dict[str, Any]]:
    """Sizes and sha256 of every file; each rank hashes a share, so no rank waits long on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    mine = {n: {"name": n, "bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)}
            for n in names[rank::world]}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (names, mine))
    for other_rank, (other_names, _) in enumerate(gathered):
        if other_names != names:  # every rank sees the same lists, so every rank raises together
            raise RuntimeError(f"rank {other_rank} sees different files in {folder} than rank {rank}: "
                               f"run.dir must be on storage that all ranks share")
    described = {n: d for _, part in gathered for n, d in part.items()}
    return [described[n] for n in names]


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, sync: GradSync, pmesh: ParallelMesh, cfg: Config,
                    plan: Plan) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash mid-save
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(sharded_state_dict(model, sync, pmesh), checkpoint_id=tmp)  # fsyncs its own files
    files = _describe_files(tmp)  # collective: every rank's shards are on disk once it returns
    if dist.get_rank() == 0:
        manifest = {
            "step": step,
            "config": to_dict(cfg),
            "world_size": dist.get_world_size(),
            "ep": pmesh.ep,
            "plan": dataclasses.asdict(plan),
            "files": files,
        }
        _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_durably(root / ".latest.tmp", final.name + "\n")
        os.replace(root / ".latest.tmp", root / "latest")
        _fsync_dir(root)
    dist.barrier()
    return final


def load_full_model(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint's weights into an unsharded model in this process (no process group needed).

    Returns the manifest. DCP reads each global expert tensor whole, whatever
    layout wrote it.
    """
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete moeyard checkpoint (no {MANIFEST})")
    state = {"model": {name: p.detach() for name, p in model.named_parameters()}}
    with warnings.catch_warnings():  # DCP warns that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return json.loads(manifest_path.read_text())
