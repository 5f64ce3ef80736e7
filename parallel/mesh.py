"""The one device mesh that fixes every process group.

Expert parallelism is carved out of data parallelism: every rank is a
data-parallel rank (dp = world); groups of `ep` consecutive ranks share one copy
of all experts, each holding num_experts / ep of them; the same expert shard is
replicated on dp / ep ranks, its expert-data-parallel (edp) group.

    world 4, ep 2:   mesh [[0, 1],      ep groups  {0,1} {2,3}
                           [2, 3]]      edp groups {0,2} {1,3}   dp group {0,1,2,3}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelMesh:
    mesh: DeviceMesh
    """2-D mesh with dims ("edp", "ep")."""
    dp_mesh: DeviceMesh
    """All ranks that hold part of the batch (the flattened mesh)."""

    @property
    def ep(self) -> int:
        return self.mesh.size(1)

    @property
    def edp(self) -> int:
        return self.mesh.size(0)

    @property
    def dp(self) -> int:
        return self.dp_mesh.size()

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("edp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.dp_mesh.get_group()


def build_mesh(ep: int, device_type: str) -> ParallelMesh:
    """Build the (edp, ep) mesh over the initialised default process group."""
    world = dist.get_world_size()
    if ep < 1 or world % ep != 0:
        raise ValueError(
            f"world size {world} is not a multiple of parallel.ep={ep}: launch a multiple of {ep} processes "
            f"or set parallel.ep to a divisor of {world}"
        )
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    # DeviceMesh has no public flatten yet; _flatten gives the dp group as a sub-mesh of the same root.
    dp_mesh = mesh._flatten("dp")
    return ParallelMesh(mesh=mesh, dp_mesh=dp_mesh)
