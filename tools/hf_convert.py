"""`moeyard convert from-hf` and `to-hf`: HF save_pretrained folders <-> moeyard checkpoints.

Both run in one process with no process group, one tensor at a time (memory stays near the largest
layer, not the model). Import reads config.json and safetensors only (no transformers needed); export
writes config.json and sharded safetensors with an index, which transformers' own classes load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from moeyard.models import build_model
from moeyard.tools.hf_config import (
    SIGMOID_ROUTER_FAMILIES,
    export_family,
    hf_config_dict,
    moe_model_config,
    read_hf_config,
)
from moeyard.tools.hf_files import SHARD_BYTES, write_safetensors_shards
from moeyard.tools.hf_weights import (
    HFTensors,
    check_embedding,
    check_hf_tensors,
    hf_tensors,
    moeyard_producers,
    mtp_shared_copies,
)
from moeyard.trainer.checkpoint.sharded import persistent_buffers
from moeyard.trainer.checkpoint.store import verify
from moeyard.trainer.checkpoint.weights import CheckpointTensors, write_weights_checkpoint
from moeyard.trainer.config.sections import build_config
from moeyard.trainer.data.compat import checkpoint_tokenizer
from moeyard.trainer.data.tokenizer import copy_tokenizer_files, hf_tokenizer_record, tokenizer_record


def import_hf(hf_dir: Path, out: Path) -> tuple[str, Path]:
    """(family, checkpoint path) of an HF MoE model converted into a weights-only moeyard checkpoint, one
    parameter at a time: a dry run over the files' headers checks every name and shape first, then each
    parameter is read, converted and written in turn (peak: one layer's stacked experts)."""
    family, model_cfg = moe_model_config(read_hf_config(hf_dir))
    dry = HFTensors(hf_dir, dry=True)
    check_embedding(dry, model_cfg, hf_dir)
    if model_cfg.mtp_layers and f"model.layers.{model_cfg.n_layers}.eh_proj.weight" not in dry:
        print(f"note: config.json says num_nextn_predict_layers={model_cfg.mtp_layers} but the safetensors hold no "
              f"model.layers.{model_cfg.n_layers}.* (a copy without its MTP modules): importing without MTP "
              f"(model.mtp_layers=0)", flush=True)
        model_cfg = dataclasses.replace(model_cfg, mtp_layers=0)
    producers = moeyard_producers(dry, model_cfg, family)
    shapes = check_hf_tensors(dry, producers, model_cfg, family)
    src = HFTensors(hf_dir)
    with torch.device("meta"):
        buffer_names = set(persistent_buffers(build_model(model_cfg)))
    buffers = {name: producers.pop(name)(src) for name in buffer_names & set(producers)}  # small: read now
    for name, _ in mtp_shared_copies(model_cfg):  # refuses an MTP copy that differs, before anything is written
        producers[name](src)
    shapes = {name: t for name, t in shapes.items() if name not in buffers}
    source = {"format": "huggingface", "family": family, "dir": str(hf_dir.resolve())}
    tokenizer = hf_tokenizer_record(hf_dir)
    if tokenizer is not None:  # a corpus for this model must be prepared with it (moeyard.trainer.data.compat)
        source["tokenizer"] = tokenizer
    nonfinite: list[str] = []

    def produce(name: str) -> torch.Tensor:
        tensor = producers[name](src)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nonfinite.append(name)
        return tensor

    written = write_weights_checkpoint(shapes, model_cfg, out, source, buffers=buffers, produce=produce)
    if nonfinite:
        print(f"note: {len(nonfinite)} tensors hold NaN or inf (first: {nonfinite[0]}): converted as they are; "
              f"a run starting from them will stop at its first non-finite loss", flush=True)
    return family, written


def _tokenizer_files(manifest: dict) -> Optional[Path]:
    """Where the tokenizer of a checkpoint's model lies: the folder its record names (the corpus a run trained
    on, the HF folder a model was imported from, what a pruned checkpoint's source recorded), only while it
    holds that tokenizer (the recorded hash is checked: a folder changed since does not count); without a
    record, the HF folder it came from as found (it had no tokenizer.json to record)."""
    recorded = checkpoint_tokenizer(manifest) or {}
    folder = Path(recorded["dir"]) if recorded.get("dir") else None
    if folder is not None and (folder / "tokenizer.json").is_file() and \
            tokenizer_record(folder)["hash"] == recorded.get("hash"):
        return folder
    if recorded and recorded.get("hash") != "bytes":
        print(f"warning: the tokenizer the checkpoint was trained with ({recorded.get('name')}, hash "
              f"{recorded.get('hash')}) is no longer at {folder}: the export has no tokenizer files", flush=True)
        return None
    source_dir = Path((manifest.get("source") or {}).get("dir", "/nonexistent"))
    return source_dir if not recorded and source_dir.is_dir() else None


def export_hf(ckpt: Path, out_dir: Path, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = SHARD_BYTES) -> tuple[str, Path]:
    """(family, folder) of a moeyard checkpoint written as an HF model of the family that computes it exactly:
    config.json and safetensors of at most `max_shard_bytes` each (with an index when there are several), in
    the checkpoint's dtype or `dtype`. One source parameter is held at a time.

    The tokenizer travels along: the one the checkpoint's run trained with (its corpus keeps the files), else
    that of the HF folder an imported checkpoint came from, when still there.
    """
    manifest = verify(ckpt)
    model_cfg = build_config(manifest["config"]).model
    CheckpointTensors(ckpt).check_shapes(model_cfg)
    family = export_family(model_cfg)
    if model_cfg.mtp_layers and family not in SIGMOID_ROUTER_FAMILIES:
        print(f"warning: the model's {model_cfg.mtp_layers} MTP depths are left out of the export: only "
              f"DeepseekV3ForCausalLM and Glm4MoeForCausalLM store MTP modules, and {family} computes the main "
              f"model alone", flush=True)
        model_cfg = dataclasses.replace(model_cfg, mtp_layers=0)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder for the export")
    with torch.device("meta"):
        model = build_model(model_cfg)
        params = {**dict(model.named_parameters()), **persistent_buffers(model)}  # router biases travel too
    entries = [(name, t.shape, dtype or t.dtype) for name, t in hf_tensors(model_cfg, family, params.__getitem__)]
    reader = CheckpointTensors(ckpt)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")  # renamed when complete: never a half-written model
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = hf_tensors(model_cfg, family, lambda name: reader.read(name, params[name]))
        write_safetensors_shards(tmp, entries, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, family, dtype), indent=1))
        tokenizer_dir = _tokenizer_files(manifest)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    except BaseException:  # a failed export leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    return family, out_dir
