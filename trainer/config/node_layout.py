"""Machines in the run's layout: ranks per machine, and the routing nodes node-limited routing counts.

The launcher knows how many ranks share a machine (its local world size); `parallel.ranks_per_node` may
say otherwise to treat one machine as several. An ep group larger than a machine spans ep / G of them;
node-limited routing (model.moe.max_nodes_per_token) bounds each token to M of `routing_nodes` expert
blocks, which must each lie on one machine. Pipeline stages are outermost in the mesh (parallel/mesh.py):
stage k holds world / pp consecutive ranks, so a stage fills whole machines (pp across machines, only the
activations between stages cross them) or several stages share one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from moeyard.errors import ConfigError, require
from moeyard.trainer.config.sections import Config


def ep_nodes(cfg: Config, ranks_per_node: int) -> int:
    """Machines one ep group spans."""
    return max(1, cfg.parallel.ep // ranks_per_node)


def _whole_machines_or_one(ranks: int, ranks_per_node: int) -> bool:
    """A group of `ranks` consecutive ranks fills whole machines or fits inside one."""
    return ranks % ranks_per_node == 0 or ranks_per_node % ranks == 0


def check_node_layout(cfg: Config, world_size: int, ranks_per_node: int) -> None:
    """Before any worker starts: machines hold equally many ranks, an ep group fills whole machines or fits
    in one, and a routing node's experts never straddle two machines."""
    G, ep = ranks_per_node, cfg.parallel.ep
    require(G >= 1 and world_size % G == 0,
            f"parallel.ranks_per_node={G} does not divide the world size {world_size}: every machine holds "
            f"as many ranks")
    require(_whole_machines_or_one(ep, G),
            f"parallel.ep={ep} and {G} ranks per machine: an ep group must fill whole machines or fit in one; "
            f"make ep a multiple or a divisor of parallel.ranks_per_node")
    pp = cfg.parallel.pp
    if pp > 1 and world_size % pp == 0 and not _whole_machines_or_one(world_size // pp, G):
        fits = [p for p in range(1, world_size + 1) if world_size % p == 0 and
                p * cfg.stages_per_rank <= cfg.model.n_layers and _whole_machines_or_one(world_size // p, G)]
        raise ConfigError(f"parallel.pp={pp} stages of {world_size // pp} ranks (dp x ep) on machines of {G} ranks: "
                          f"a stage must fill whole machines or fit in one, or a machine holds parts of two "
                          f"stages and their dp and ep groups straddle it; use parallel.pp in {fits}")
    moe, nodes = cfg.model.moe, ep_nodes(cfg, G)
    if moe.max_nodes_per_token is not None and moe.routing_nodes is not None and nodes > 1:
        require(moe.routing_nodes % nodes == 0,
                f"model.moe.routing_nodes={moe.routing_nodes} does not keep each routing node on one machine: "
                f"the ep group spans {nodes} machines; set it to a multiple of {nodes} or null")
    if cfg.schedule.dispatch == "hierarchical":
        require(nodes > 1, f"schedule.dispatch=hierarchical needs an ep group that spans machines: parallel.ep={ep} "
                f"fits in one machine of {G} ranks (set parallel.ranks_per_node to simulate machines)")


def node_layout_notes(cfg: Config, ranks_per_node: int) -> list[str]:
    """What a user should know about this layout (printed once by the launcher)."""
    moe, nodes = cfg.model.moe, ep_nodes(cfg, ranks_per_node)
    notes = []
    groups = moe.sigmoid_bias.n_groups
    if moe.router == "sigmoid_bias" and groups > 1 and nodes > 1 and groups % nodes != 0:
        notes.append(f"model.moe.sigmoid_bias.n_groups={groups} expert groups do not each sit on one of the {nodes} "
                     f"machines the ep group spans: group-limited routing (topk_groups) does not bound the "
                     f"machines a token reaches; model.moe.max_nodes_per_token does")
    if moe.max_nodes_per_token is not None and nodes == 1 and moe.routing_nodes is None:
        notes.append("model.moe.max_nodes_per_token has no effect: the ep group fits in one machine "
                     "(set model.moe.routing_nodes to bound tokens to expert blocks anyway)")
    elif moe.max_nodes_per_token is not None and moe.routing_nodes is None:
        notes.append(f"node-limited routing over routing_nodes={nodes}, the machines the ep group spans: another "
                     f"layout routes differently; set model.moe.routing_nodes={nodes} to keep this routing")
    return notes


def ranks_per_machine(nodes: Sequence[str]) -> Optional[int]:
    """G when every machine (`nodes[r]`: where rank r runs) holds G consecutive ranks; None otherwise
    (cyclic placement, or machines with different numbers of ranks)."""
    G = 1
    while G < len(nodes) and nodes[G] == nodes[0]:
        G += 1
    if len(nodes) % G:
        return None
    blocks = [nodes[i:i + G] for i in range(0, len(nodes), G)]
    names = [block[0] for block in blocks]
    return G if all(len(set(b)) == 1 for b in blocks) and len(set(names)) == len(names) else None


def with_node_layout(cfg: Config, world_size: int, local_world_size: int) -> Config:
    """The config with parallel.ranks_per_node filled from the launcher, and model.moe.routing_nodes from the
    machines an ep group spans where it is null (checked). Without max_nodes_per_token routing_nodes only
    makes the run log how many machines a token reaches."""
    G = cfg.parallel.ranks_per_node or local_world_size
    check_node_layout(cfg, world_size, G)
    model = cfg.model
    limited = model.moe.max_nodes_per_token is not None
    if model.moe.routing_nodes is None and (limited or ep_nodes(cfg, G) > 1) and model.moe.router != "expert_choice":
        moe = dataclasses.replace(model.moe, routing_nodes=ep_nodes(cfg, G))
        model = dataclasses.replace(model, moe=moe)
    return dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(cfg.parallel, ranks_per_node=G))
