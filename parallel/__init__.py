"""Process groups, token exchange and gradient reduction for expert parallelism."""
from moeyard.parallel.exchange.dispatch import ExpertParallelExchange
from moeyard.parallel.grads.reduce import (
    ParamGroups,
    clip_gradients,
    global_grad_norm,
    reduce_gradients,
    split_parameters,
)
from moeyard.parallel.mesh import ParallelMesh, build_mesh
from moeyard.parallel.parallelize import apply_expert_parallel

__all__ = [
    "ExpertParallelExchange", "ParallelMesh", "ParamGroups", "apply_expert_parallel", "build_mesh",
    "clip_gradients", "global_grad_norm", "reduce_gradients", "split_parameters",
]
