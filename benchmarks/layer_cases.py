"""One MoE layer on this rank, four ways: an independent reference, moeyard, DeepSpeed-MoE, the matmul floor.

Every rank of the gloo group calls these functions in the same order: building
the layers, checking them and timing them are all collective. The reference and
the floor are plain torch, written here, so neither borrows moeyard's code.

Shape legend: T tokens on this rank, D model dim, F expert hidden dim, E global
experts, L experts on this rank, K experts per token.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moeyard.models import MoE, MoEConfig
from moeyard.parallel import ExpertParallelExchange


@dataclass(frozen=True)
class Case:
    tokens: int
    """Tokens per rank."""
    experts: int
    dim: int
    ffn: int
    top_k: int = 2


@dataclass(frozen=True)
class Weights:
    """The global layer: router and every expert, the same on every rank (seeded)."""

    router_ED: Tensor
    gate_EDF: Tensor
    up_EDF: Tensor
    down_EFD: Tensor

    def local(self, rank: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
        L = self.gate_EDF.shape[0] // world
        return tuple(w[rank * L:(rank + 1) * L] for w in (self.gate_EDF, self.up_EDF, self.down_EFD))


def weights_on(W: Weights, device: torch.device) -> Weights:
    return Weights(*(t.to(device) for t in (W.router_ED, W.gate_EDF, W.up_EDF, W.down_EFD)))


def make_weights(case: Case, seed: int = 0) -> Weights:
    g = torch.Generator().manual_seed(seed)
    E, D, Fh = case.experts, case.dim, case.ffn
    return Weights(torch.randn(E, D, generator=g) * D ** -0.5, torch.randn(E, D, Fh, generator=g) * D ** -0.5,
                   torch.randn(E, D, Fh, generator=g) * D ** -0.5, torch.randn(E, Fh, D, generator=g) * Fh ** -0.5)


def make_inputs(case: Case, rank: int) -> tuple[Tensor, Tensor]:
    """This rank's tokens and the output gradient the backward starts from."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(case.tokens, case.dim, generator=g), torch.randn(case.tokens, case.dim, generator=g)


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def top_k_routing(x_ND: Tensor, router_ED: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax over experts, the k best, weights renormalised to sum to one (Mixtral; DeepSpeed top-2)."""
    weight_NK, expert_NK = (x_ND @ router_ED.t()).softmax(dim=-1).topk(k, dim=-1)
    return weight_NK / weight_NK.sum(dim=-1, keepdim=True), expert_NK


# ---- the independent reference: every expert on this rank, plain autograd --------------------------------

def reference_grads(case: Case, W: Weights, x: Tensor, dy: Tensor) -> dict[str, Tensor]:
    """Output and gradients of the dropless top-k layer for this rank's tokens; expert gradients are summed
    over ranks (as expert parallelism sums them) and cut to this rank's experts."""
    leaves = [t.clone().requires_grad_() for t in (x, W.router_ED, W.gate_EDF, W.up_EDF, W.down_EFD)]
    x_l, router, gate, up, down = leaves
    weight_NK, expert_NK = top_k_routing(x_l, router, case.top_k)
    y = torch.zeros_like(x_l)
    for e in range(case.experts):
        token, slot = (expert_NK == e).nonzero(as_tuple=True)
        out = swiglu(x_l[token], gate[e], up[e], down[e]) * weight_NK[token, slot].unsqueeze(-1)
        y = y.index_add(0, token, out)
    y.backward(dy)
    expert_grads = torch.stack([gate.grad, up.grad, down.grad.transpose(1, 2)])
    dist.all_reduce(expert_grads)
    rank, world = dist.get_rank(), dist.get_world_size()
    L = case.experts // world
    g_gate, g_up, g_down = expert_grads[:, rank * L:(rank + 1) * L]
    return {"y": y.detach(), "x": x_l.grad, "router": router.grad, "gate": g_gate, "up": g_up,
            "down": g_down.transpose(1, 2)}


def max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Largest |got - want| over each tensor's largest |want|, over all tensors, all ranks."""
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-30)) for k in want)
    t = torch.tensor([worst], dtype=torch.float64, device=next(iter(want.values())).device)  # NCCL: on the GPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ---- moeyard ---------------------------------------------------------------------------------------------

class MoeyardLayer:
    """moeyard's MoE layer with this rank's expert shard and the all-to-all exchange (r chunks)."""

    def __init__(self, case: Case, W: Weights, chunks: int, exchange: Optional[ExpertParallelExchange] = None,
                 compute: str = "loop") -> None:
        """`exchange`: another than the flat one over the world (hierarchical); `compute`: the experts'
        (model.moe.expert_compute). On W's device."""
        cfg = MoEConfig(num_experts=case.experts, top_k=case.top_k, ffn_dim=case.ffn, expert_compute=compute,
                        aux_loss_coef=0.0, z_loss_coef=0.0)
        self.moe = MoE(case.dim, cfg).to(W.router_ED.device)
        gate, up, down = W.local(dist.get_rank(), dist.get_world_size())
        self.moe.router.weight_ED = nn.Parameter(W.router_ED.clone())
        self.moe.experts.w_gate_EDF = nn.Parameter(gate.clone())
        self.moe.experts.w_up_EDF = nn.Parameter(up.clone())
        self.moe.experts.w_down_EFD = nn.Parameter(down.clone())
        self.moe.exchange = exchange or ExpertParallelExchange(dist.group.WORLD, dist.group.WORLD, chunks=chunks)

    def step(self, x: Tensor, dy: Tensor) -> dict[str, Tensor]:
        for p in self.moe.parameters():
            p.grad = None
        x = x.detach().requires_grad_()
        y, _ = self.moe(x.unsqueeze(0))
        y.backward(dy.unsqueeze(0))
        e = self.moe.experts
        return {"y": y.detach()[0], "x": x.grad, "router": self.moe.router.weight_ED.grad,
                "gate": e.w_gate_EDF.grad, "up": e.w_up_EDF.grad, "down": e.w_down_EFD.grad}


# ---- DeepSpeed-MoE ---------------------------------------------------------------------------------------

class SwiGLUExpert(nn.Module):
    """The same expert function for DeepSpeed, which deep-copies one module per local expert."""

    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(dim, ffn))
        self.w_up = nn.Parameter(torch.empty(dim, ffn))
        self.w_down = nn.Parameter(torch.empty(ffn, dim))

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


class DeepSpeedLayer:
    """`deepspeed.moe.layer.MoE`, top-2, no random token selection, no sampled second expert."""

    def __init__(self, case: Case, W: Weights, capacity_factor: Optional[float]) -> None:
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

        world = dist.get_world_size()
        cf = capacity_factor if capacity_factor is not None else 1.0
        self.moe = DeepSpeedMoE(case.dim, SwiGLUExpert(case.dim, case.ffn), num_experts=case.experts, ep_size=world,
                                k=case.top_k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=0,
                                drop_tokens=capacity_factor is not None, use_rts=False,
                                top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        gate, up, down = W.local(dist.get_rank(), world)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(W.router_ED)
            for j, expert in enumerate(self.experts):
                expert.w_gate.copy_(gate[j])
                expert.w_up.copy_(up[j])
                expert.w_down.copy_(down[j])

    @property
    def experts(self) -> list[SwiGLUExpert]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def step(self, x: Tensor, dy: Tensor) -> dict[str, Tensor]:
        for p in self.moe.parameters():
            p.grad = None
        x = x.detach().requires_grad_()
        y, _, _ = self.moe(x.unsqueeze(0))
        y.backward(dy.unsqueeze(0))
        ex = self.experts
        return {"y": y.detach()[0], "x": x.grad, "router": self.moe.deepspeed_moe.gate.wg.weight.grad,
                "gate": torch.stack([e.w_gate.grad for e in ex]), "up": torch.stack([e.w_up.grad for e in ex]),
                "down": torch.stack([e.w_down.grad for e in ex])}


def init_deepspeed() -> None:
    """Let DeepSpeed adopt the gloo group; skip its shared-memory op, which it would compile on first use."""
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm

    ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


# ---- the floor -------------------------------------------------------------------------------------------

def dropless_rows(case: Case, W: Weights, x: Tensor) -> list[int]:
    """Rows each of this rank's experts computes without drops: its copies from every rank's tokens."""
    _, expert_NK = top_k_routing(x, W.router_ED, case.top_k)
    counts_E = torch.bincount(expert_NK.flatten(), minlength=case.experts)
    dist.all_reduce(counts_E)
    rank, world = dist.get_rank(), dist.get_world_size()
    L = case.experts // world
    return counts_E[rank * L:(rank + 1) * L].tolist()


class MatmulFloor:
    """This rank's dropless expert work alone: per expert the 3 forward and 6 backward GEMMs of a SwiGLU,
    with the fused SiLU backward, on preallocated inputs. No routing, no movement, no communication."""

    def __init__(self, case: Case, W: Weights, rows: list[int]) -> None:
        g = torch.Generator().manual_seed(7)
        self.weights = list(zip(*W.local(dist.get_rank(), dist.get_world_size())))
        self.inputs = [(torch.randn(n, case.dim, generator=g), torch.randn(n, case.dim, generator=g)) for n in rows]

    def step(self) -> None:
        for (x, dy), (w_gate, w_up, w_down) in zip(self.inputs, self.weights):
            h1, h2 = x @ w_gate, x @ w_up
            act = F.silu(h1)
            h = act * h2
            _y = h @ w_down
            _grad_down = h.t() @ dy
            dh = dy @ w_down.t()
            dh1 = torch.ops.aten.silu_backward(dh * h2, h1)
            dh2 = dh * act
            _grad_gate, _grad_up = x.t() @ dh1, x.t() @ dh2
            dx = dh1 @ w_gate.t()
            dx.addmm_(dh2, w_up.t())


# ---- timing ----------------------------------------------------------------------------------------------

def time_interleaved(steps: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """Median over repetitions of the slowest rank's time for one call of each step, in ms.

    The systems take turns within every repetition, so a slow spell of the machine hits all of them
    alike; ranks start each call together (barrier)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = torch.zeros(len(steps), reps, dtype=torch.float64)
    for r in range(reps):
        for i, step in enumerate(steps.values()):
            dist.barrier()
            start = time.perf_counter()
            step()
            times[i, r] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {name: 1e3 * statistics.median(times[i].tolist()) for i, name in enumerate(steps)}
