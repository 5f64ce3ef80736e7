"""Which dtype the run computes in."""
from __future__ import annotations

import torch


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 autocast on GPU; float32 on CPU, where bf16 matmuls are far slower."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
