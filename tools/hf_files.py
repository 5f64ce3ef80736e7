"""Hugging Face weight files written one tensor at a time: sharded safetensors and their index.

safetensors is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of each
tensor), then the raw bytes in that order. Shapes and dtypes are known before any data (from a dry run
of the conversion on the meta device), so the header is written first and each tensor's bytes follow as
the conversion makes it: a file is never held in memory, only the tensor being written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

SHARD_BYTES = 5 * 10**9
"""Most bytes per file (the size transformers' save_pretrained shards at)."""
INDEX = "model.safetensors.index.json"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_shards(entries: list[tuple[str, torch.Size, torch.dtype]],
                max_bytes: int = SHARD_BYTES) -> list[list[tuple[str, torch.Size, torch.dtype]]]:
    """Consecutive entries grouped into files of at most `max_bytes` (a larger tensor gets a file alone)."""
    shards: list[list[tuple[str, torch.Size, torch.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].numel() * entry[2].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _header(entries: list[tuple[str, torch.Size, torch.dtype]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + shape.numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def write_safetensors_shards(out_dir: Path, entries: list[tuple[str, torch.Size, torch.dtype]],
                             tensors: Iterator[tuple[str, Tensor]], max_bytes: int = SHARD_BYTES) -> list[str]:
    """Write `tensors` (in the order and with the shapes and dtypes of `entries`) as model.safetensors, or
    as model-0000i-of-0000n.safetensors with an index when they exceed `max_bytes`; each file is written
    under a temporary name and renamed when complete. Returns the file names."""
    shards = plan_shards(entries, max_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tmp = out_dir / f".{file_name}.tmp"
        with open(tmp, "wb") as f:
            header = _header(shard)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name, shape, dtype in shard:
                got_name, t = next(tensors)
                if got_name != name or t.shape != shape:
                    raise RuntimeError(f"conversion produced {got_name} {tuple(t.shape)} where the dry run "
                                       f"planned {name} {tuple(shape)}")
                f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().data)  # no copy of the bytes
                weight_map[name] = file_name
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / file_name)
    if len(names) > 1:
        total = sum(shape.numel() * dtype.itemsize for _, shape, dtype in entries)
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=1))
    return names
