"""Process groups, token exchange and gradient reduction for expert parallelism."""
from .dispatch import ExpertParallelExchange
from .expert_parallel import apply_expert_parallel
from .gradients import ParamGroups, clip_gradients, global_grad_norm, reduce_gradients, split_parameters
from .mesh import ParallelMesh, build_mesh

__all__ = [
    "ExpertParallelExchange", "ParallelMesh", "ParamGroups", "apply_expert_parallel", "build_mesh",
    "clip_gradients", "global_grad_norm", "reduce_gradients", "split_parameters",
]
