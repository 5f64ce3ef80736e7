"""Process groups, token exchange and gradient reduction for expert parallelism.

The names below load their modules on first use (PEP 562): the launcher imports small parts of this
package (parallel.agree, parallel.stages) and must not pay for FSDP and DTensor, which only workers need.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ExpertParallelExchange": "moeyard.parallel.exchange.dispatch",
    "ParamGroups": "moeyard.parallel.grads.reduce",
    "clip_gradients": "moeyard.parallel.grads.reduce",
    "global_grad_norm": "moeyard.parallel.grads.reduce",
    "reduce_gradients": "moeyard.parallel.grads.reduce",
    "split_parameters": "moeyard.parallel.grads.reduce",
    "ParallelMesh": "moeyard.parallel.mesh",
    "build_mesh": "moeyard.parallel.mesh",
    "apply_expert_parallel": "moeyard.parallel.parallelize",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
