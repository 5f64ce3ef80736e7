"""Give a model built on the meta device its memory and initial values, this rank's part only.

Runs after expert parallelism and FSDP have decided what each rank owns: every parameter is then
allocated at its local size, and `InitRecord.replay` provides each parameter's full initial values
one at a time, of which this rank copies its region.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moeyard.models import Transformer, expert_parameter_ids
from moeyard.models.meta_init import InitRecord
from moeyard.parallel.fsdp import global_expert_view
from moeyard.parallel.mesh import ParallelMesh


def owned_region(p: Tensor, pmesh: ParallelMesh, expert: bool) -> tuple[Tensor, tuple[slice, ...]]:
    """This rank's storage of a parameter, and the part of the full (global) tensor it holds."""
    if isinstance(p, DTensor):
        view = global_expert_view(p, pmesh) if expert else p
        shape, offset = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
        return view.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    if expert:  # ep shard of the stacked experts, dim 0
        local = p.shape[0]
        return p, (slice(pmesh.ep_rank * local, (pmesh.ep_rank + 1) * local),)
    return p, ()


@torch.no_grad()
def materialize(model: Transformer, init: InitRecord, pmesh: ParallelMesh, device: torch.device) -> None:
    """Allocate this rank's parameters and buffers on `device` and fill them with the values `Transformer`
    would have drawn under the same seed (the generator ends where that construction leaves it)."""
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    expert_ids = expert_parameter_ids(model)
    params: dict[str, nn.Parameter] = dict(model.named_parameters())

    filled: set[str] = set()

    def keep(name: str, values: Tensor) -> None:
        if name not in params:  # another pipeline stage's (parallel/pipeline.py): drawn, not kept
            return
        p = params[name]
        local, region = owned_region(p, pmesh, id(p) in expert_ids)
        local.copy_(values[region])
        filled.add(name)

    init.replay(keep)
    if missing := sorted(set(params) - filled):  # made without a recorded draw or fill: its values are lost
        raise RuntimeError(f"meta-device initialisation recorded no values for {missing[:3]}: initialise them "
                           f"with an in-place draw or fill (nn.init) so that moeyard.models.meta_init sees it")
