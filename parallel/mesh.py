"""The one device mesh that fixes every process group.

Expert parallelism is carved out of data parallelism: every rank is a
data-parallel rank (dp = world); groups of `ep` consecutive ranks share one copy
of all experts, each holding num_experts / ep of them; the same expert shard is
replicated on dp / ep ranks, its expert-data-parallel (edp) group.

    world 4, ep 2:   mesh [[0, 1],      ep groups  {0,1} {2,3}
                           [2, 3]]      edp groups {0,2} {1,3}   dp group {0,1,2,3}

Pipeline stages (pp) are outermost: stage s holds ranks [s * world/pp, (s+1) * world/pp), and inside a
stage the layout above repeats over its world/pp ranks (dp is then world/pp). A rank's pp group holds the
ranks at its position in every stage, which exchange activations:

    world 4, pp 2, ep 2:   stage 0 {0,1}, stage 1 {2,3};   pp groups {0,2} {1,3};   ep groups {0,1} {2,3}

Machines hold `ranks_per_node` consecutive ranks (G). An ep group larger than a machine spans ep / G whole
machines, and its experts are laid out machine by machine (machine j of the group holds experts
[j*E/n, (j+1)*E/n) for n machines); for the hierarchical exchange it is cut twice more:

    world 4, ep 4, G 2:   node groups {0,1} {2,3} (inside a machine)
                          cross groups {0,2} {1,3} (the same local rank on each machine)
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moeyard.parallel.lanes import make_twins


@dataclass(frozen=True)
class ParallelMesh:
    mesh: DeviceMesh
    """2-D mesh with dims ("edp", "ep")."""
    dp_group: dist.ProcessGroup
    """The ranks that split the batch: the whole world, or this rank's pipeline stage."""
    dp_mesh: DeviceMesh
    """1-D mesh over dp_group: where FSDP shards the dense parameters."""
    experts_mesh: DeviceMesh
    """The (ep, edp) transpose of `mesh`: a global expert tensor [E, ...] sharded on dim 0 over ep, each
    piece again over edp (FSDP's shard of an ep shard) is `[Shard(0), Shard(d)]` on it (d: the dimension
    `shards.expert_shard_dim` picks)."""
    ranks_per_node: int = 1
    """Consecutive ranks that share a machine (G)."""
    node_group: Optional[dist.ProcessGroup] = None
    """Where the ep group spans machines: this rank's part of it on its own machine (G ranks)."""
    cross_group: Optional[dist.ProcessGroup] = None
    """...and the ranks of the ep group with this rank's local index, one per machine."""
    pp_group: Optional[dist.ProcessGroup] = None
    """With pipeline stages: the ranks at this rank's position in every stage, in stage order."""
    embedding_group: Optional[dist.ProcessGroup] = None
    """With pipeline stages, on the first and last stage: this rank and its counterpart on the other one, which
    hold the embedding and its copy (models' keep_stage)."""

    @property
    def pp(self) -> int:
        return 1 if self.pp_group is None else dist.get_world_size(self.pp_group)

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return 0 if self.pp_group is None else dist.get_rank(self.pp_group)

    @property
    def ep_nodes(self) -> int:
        """Machines one ep group spans (1 when it fits in one)."""
        return max(1, self.ep // self.ranks_per_node)

    @property
    def ep(self) -> int:
        return self.mesh.size(1)

    @property
    def edp(self) -> int:
        return self.mesh.size(0)

    @property
    def dp(self) -> int:
        return dist.get_world_size(self.dp_group)

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("edp")

    @property
    def edp_mesh(self) -> DeviceMesh:
        """1-D mesh over this rank's edp group: where FSDP shards this rank's experts."""
        return self.mesh["edp"]


def build_mesh(ep: int, device_type: str, timeout_s: float = 600.0,
               ranks_per_node: Optional[int] = None, pp: int = 1, lanes: bool = False) -> ParallelMesh:
    """Build the (edp, ep) mesh of this rank's pipeline stage (the whole world without stages) over the
    initialised default process group; with `ranks_per_node` (G) also the node and cross groups of ep
    groups that span machines; with `pp` > 1 the pp groups; with `lanes`, a twin of every group the expert
    exchange uses, for the backward lane (parallel/lanes.py).

    `timeout_s` (parallel.timeout_s) bounds every collective on the mesh's groups: `new_group` does not
    inherit the default group's timeout (gloo's own default is 30 minutes), so without it a lost peer
    would hang an expert exchange far beyond the configured limit.

    The groups are made with `new_group` and wrapped by `DeviceMesh.from_group`:
    meshes whose groups torch creates itself (init_device_mesh plus a flattened
    or second mesh) aborted at interpreter exit in about 1 run in 5 with gloo
    on torch 2.13 ("terminate called without an active exception").
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    G = ranks_per_node or world
    # Checked with the user's keys and fixes when the run config was resolved (trainer/config): here, asserted.
    assert pp >= 1 and world % pp == 0, f"world {world} is not a multiple of pp={pp}"
    dp = world // pp
    assert ep >= 1 and dp % ep == 0, f"world {world} / pp={pp} is not a multiple of ep={ep}"
    assert world % G == 0 and (ep % G == 0 or G % ep == 0), f"ranks_per_node={G} does not fit world {world}, ep={ep}"
    stages = torch.arange(world).view(pp, dp // ep, ep)  # [stage, edp, ep]
    timeout = timedelta(seconds=timeout_s)
    # Every rank creates every group, in the same order, as new_group requires; it keeps its own.
    mine: dict[str, dist.ProcessGroup] = {}
    exchange_groups: list[tuple[list[int], Optional[dist.ProcessGroup]]] = []  # every rank's, in order

    def group(kind: str, ranks: list[int]) -> None:
        made = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine[kind] = made
        if kind in ("ep", "dp", "node", "cross"):
            exchange_groups.append((ranks, made if rank in ranks else None))

    for layout in stages:
        for row in layout:
            group("ep", row.tolist())
        for col in layout.t():
            group("edp", col.tolist())
        group("dp", layout.flatten().tolist())
    if ep > G:
        for layout in stages:
            for machines in layout.view(-1, ep // G, G):  # [ep group, machine in it, local rank]
                for row in machines:
                    group("node", row.tolist())
                for col in machines.t():
                    group("cross", col.tolist())
    if pp > 1:
        for position in stages.view(pp, dp).t():
            group("pp", position.tolist())
        for position in stages.view(pp, dp).t():
            group("embedding", [int(position[0]), int(position[-1])])
    if lanes:
        make_twins(exchange_groups, timeout)
    layout = stages[rank // dp]
    mesh = DeviceMesh.from_group([mine["edp"], mine["ep"]], device_type, mesh=layout, mesh_dim_names=("edp", "ep"))
    experts_mesh = DeviceMesh.from_group([mine["ep"], mine["edp"]], device_type, mesh=layout.t(),
                                         mesh_dim_names=("ep", "edp"))
    return ParallelMesh(mesh=mesh, dp_group=mine["dp"],
                        dp_mesh=DeviceMesh.from_group(mine["dp"], device_type, mesh=layout.flatten()),
                        experts_mesh=experts_mesh, ranks_per_node=G, node_group=mine.get("node"),
                        cross_group=mine.get("cross"), pp_group=mine.get("pp"),
                        embedding_group=mine.get("embedding"))
