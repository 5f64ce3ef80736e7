"""Apply expert parallelism to a single-device model from the outside."""
from __future__ import annotations

from torch import nn

from moeyard.models import Transformer
from moeyard.parallel.exchange.dispatch import ExpertParallelExchange
from moeyard.parallel.mesh import ParallelMesh


def apply_expert_parallel(model: Transformer, pmesh: ParallelMesh) -> None:
    """Keep this rank's slice of every expert weight (dim 0) and install the all-to-all exchange.

    Call before building the optimizer: expert parameters are replaced by their shard.
    """
    for layer, moe in model.moe_layers():
        num_experts = moe.cfg.num_experts
        if num_experts % pmesh.ep != 0:
            raise ValueError(f"MoE layer {layer} has {num_experts} experts (model.moe.num_experts or "
                             f"num_experts_per_layer), not divisible by parallel.ep={pmesh.ep}")
        local = num_experts // pmesh.ep
        start = pmesh.ep_rank * local
        experts = moe.experts
        for name, weight in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, nn.Parameter(weight.detach()[start:start + local].clone(),
                                                  requires_grad=weight.requires_grad))
        moe.exchange = ExpertParallelExchange(pmesh.ep_group, pmesh.dp_group)
