"""Offline tools on one checkpoint: describe it, and export a consolidated safetensors copy.

Both run in a single process without a process group.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeyard.errors import CheckpointError
from moeyard.models import build_model
from moeyard.trainer.checkpoint import safe_read
from moeyard.trainer.checkpoint.sharded import load_full_model, persistent_buffers
from moeyard.trainer.checkpoint.store import base_of, read_manifest, verify
from moeyard.trainer.checkpoint.weights import CheckpointTensors
from moeyard.trainer.config.sections import build_config


def inspect_checkpoint(path: Path) -> tuple[str, bool]:
    """What the checkpoint holds, how it was laid out, and whether every file is intact (the flag)."""
    try:
        manifest = verify(path)
        base_of(manifest, path)  # a trainable-only checkpoint is only as good as its base
        CheckpointTensors(path).check_shapes(build_config(manifest["config"]).model)
        meta = safe_read.read_metadata(path)
        status, intact = "intact (every file matches its size and sha256)", True
    except CheckpointError as err:
        manifest, status, intact = read_manifest(path), f"DAMAGED: {err}", False
        try:
            meta = safe_read.read_metadata(path)
        except CheckpointError:
            meta = None
    plan = manifest.get("plan", {})
    lines = [
        f"checkpoint {path}",
        f"  status: {status}",
        f"  step {manifest['step']}, {manifest['samples']} sequences consumed, config hash {manifest['config_hash']}",
        f"  written by {manifest['world_size']} ranks, ep={manifest['ep']} "
        f"(experts as global tensors, sharded on dim 0: loads at any world size and ep)",
        f"  plan: chunks {plan.get('chunks')}, grad sync {plan.get('grad_sync')}",
        f"  files: {len(manifest['files'])}, {sum(f['bytes'] for f in manifest['files']) / 2**20:.1f} MiB",
        "  tensors:",
    ]
    if "base" in manifest:
        base = manifest["base"]
        lines.insert(-1, f"  holds the weights that trained only; the rest comes from its base {base['path']} "
                         f"(content hash {base['content_hash']})")
    if meta is None:
        return "\n".join([*lines, "    (unreadable: see the status)"]), intact
    groups: dict[str, list[tuple[str, object]]] = {}
    for key, md in sorted(meta.state_dict_metadata.items()):
        groups.setdefault(key.split(".")[0], []).append((key, md))
    for group, items in groups.items():
        numel = sum(md.size.numel() for _, md in items if hasattr(md, "size"))
        lines.append(f"    {group}: {len(items)} tensors, {numel:,} elements")
        if group == "model":
            for key, md in items:
                chunks = len(md.chunks)
                layout = f"{chunks} shards" if chunks > 1 else "whole"
                lines.append(f"      {key[len('model.'):]:48} {str(tuple(md.size)):22} {str(md.properties.dtype):16} "
                             f"{layout}")
    return "\n".join(lines), intact


def export_safetensors(path: Path, out_dir: Path) -> Path:
    """A consolidated copy for inference: model.safetensors (all experts in one tensor per weight) and
    config.json (the model section of the training config)."""
    manifest = verify(path)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder for the export")
    cfg = build_config(manifest["config"])
    CheckpointTensors(path).check_shapes(cfg.model)
    with torch.device("cpu"):
        model = build_model(cfg.model)
    load_full_model(path, model)
    # safetensors refuses tensors that share memory (tied embeddings): store each name once, contiguous.
    # Router buffers (sigmoid_bias's expert biases) decide routing at inference too: they go along.
    tensors = {name: t.detach().contiguous().clone()
               for name, t in [*model.named_parameters(), *persistent_buffers(model).items()]}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "moeyard_step": str(manifest["step"])})
    (out_dir / "config.json").write_text(json.dumps(manifest["config"]["model"], indent=1))
    return out_dir / "model.safetensors"
