"""Hardware descriptions (YAML) and the analytic unit costs the simulator uses with them.

A description gives sustained rates, not peaks: the GEMM TFLOP/s a large
bf16 matmul reaches, per-device link bandwidth within and across nodes, link
latency, memory bandwidth for the optimizer, and how much compute slows down
while communication runs beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from moeyard.trainer.scheduler.cost_model import Phase, Workload


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    devices_per_node: int
    gemm_tflops: float
    """Sustained dense GEMM rate per device."""
    fp8_gemm_tflops: float = 0.0
    """Sustained rate of GEMMs in float8 with row-wise scales (train.fp8); 0: unknown, charged at gemm_tflops."""
    attention_tflops: float = 0.0
    """Sustained rate of the attention kernel (scores and weighted sum, forward and backward); 0: the GEMM
    rate."""
    intra_node_gbps: float
    """GB/s one device can send to the others in its node (per direction)."""
    intra_node_latency_us: float
    inter_node_gbps: float
    """GB/s one device can send off its node."""
    inter_node_latency_us: float
    memory_gbps: float
    """Device memory bandwidth (element-wise optimizer work)."""
    overlap_slowdown: float = 1.0
    """Factor by which compute and communication both slow down while they run together."""
    chunk_overhead_us: float = 30.0
    """Host cost of each extra pipeline chunk per pass: kernel launches and stream/event synchronisation."""
    act_bytes: int = 2
    """Bytes per activation element on the wire (2: bf16)."""
    memory_gb: float = 0.0
    """Device memory in GB (10^9 bytes); 0: unknown, and `moeyard plan` cannot say whether a run fits."""

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "Hardware":
        """A description read from `source` (named in the error when a key is unknown)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**data)


def fp8_cast_bytes(w: Workload) -> int:
    """Bytes moved per element an FP8 cast quantizes (models/float8.py's quantize_rows, eager): the operand
    read twice (its rows' largest entries, then the scaled cast), one byte written."""
    return 2 * w.act_bytes + 1


class HardwareCosts:
    """Unit costs from a description, for a world of `world_size` devices laid out node by node."""

    def __init__(self, hw: Hardware) -> None:
        self.hw = hw
        self.overlap_slowdown = hw.overlap_slowdown
        self.chunk_overhead_s = hw.chunk_overhead_us * 1e-6

    def _gemm(self, flops: float) -> float:
        return flops / (self.hw.gemm_tflops * 1e12)

    def dense(self, w: Workload, layer: int, phase: Phase) -> float:
        """GEMMs at the GEMM rate (FP8 ones at theirs, with their operands' casts), attention at its kernel's,
        memory-bound kernels at memory bandwidth; backward twice the forward."""
        fp8 = w.fp8_linears_of(layer)
        fp8_flops = sum(2.0 * w.tokens * i * o for i, o in fp8)
        seconds = (self._gemm(w.layer_flops(layer) - w.attention_flops_of(layer) - fp8_flops)
                   + fp8_flops / ((self.hw.fp8_gemm_tflops or self.hw.gemm_tflops) * 1e12)
                   + self.selective_recompute(w, layer))
        return seconds * (2 if phase == "bwd" else 1) + self._fp8_casts(w, fp8, phase)

    def _fp8_casts(self, w: Workload, widths: tuple[tuple[int, int], ...], phase: Phase) -> float:
        """Quantizing the FP8 GEMMs' operands (fp8_cast_bytes an element). Forward casts the input rows [M, K]
        and the weight [N, K]; backward the output gradient twice (by rows, by columns), the input and the
        weight again."""
        if not widths:
            return 0.0
        m = w.tokens
        if phase == "fwd":
            elements = sum(m * k + k * n for k, n in widths)
        else:
            elements = sum(2 * m * n + m * k + k * n for k, n in widths)
        return elements * fp8_cast_bytes(w) / (self.hw.memory_gbps * 1e9)

    def selective_recompute(self, w: Workload, layer: int) -> float:
        """Attention's core at its kernel's rate and the memory-bound kernels at memory bandwidth (those of
        permuting rows and combining them, which selective keeps, included: a small overestimate)."""
        moved = w.elementwise_bytes[layer] if 0 <= layer < len(w.elementwise_bytes) else 0.0
        rate = (self.hw.attention_tflops or self.hw.gemm_tflops) * 1e12
        return w.attention_flops_of(layer) / rate + moved / (self.hw.memory_gbps * 1e9)

    def experts(self, w: Workload, rows: float, phase: Phase, chunks: int = 1) -> float:
        """Three GEMMs forward, six backward; with fp8_experts the forward's and the input gradient's three at
        the FP8 rate, with their operands' casts: each GEMM casts its rows, each expert weight is cast once a
        pass, shared by the pass's `chunks` (models/float8.py shared_weight_casts), each charged its part."""
        gemms = self._gemm(6 * rows * w.dim * w.expert_hidden)
        if not w.fp8_experts:
            return gemms * (2 if phase == "bwd" else 1)
        fp8 = 6 * rows * w.dim * w.expert_hidden / ((self.hw.fp8_gemm_tflops or self.hw.gemm_tflops) * 1e12)
        d, f = w.dim, w.expert_hidden
        weights = 3 * (w.num_experts // w.ep) * d * f / chunks  # this rank's gate, up and down
        elements = rows * (2 * d + f) + weights if phase == "fwd" else rows * (d + 2 * f) + weights
        return fp8 + (gemms if phase == "bwd" else 0.0) + elements * fp8_cast_bytes(w) / (self.hw.memory_gbps * 1e9)

    def fp8_dispatch_casts(self, w: Workload, rows: float) -> tuple[float, float]:
        """Packing (fp8_cast_bytes, cast straight into the wire buffer) and unpacking (the e4m3 byte read, the
        value written in the compute dtype, then read and written again by the scale's multiply: 1 + 3
        act_bytes) of `rows` rows, at memory bandwidth."""
        elements, rate = rows * w.dim, self.hw.memory_gbps * 1e9
        return elements * fp8_cast_bytes(w) / rate, elements * (1 + 3 * w.act_bytes) / rate

    def all_to_all(self, w: Workload, nbytes: float) -> float:
        """ep consecutive ranks: peers in the same node use NVLink-class links, the rest the network."""
        hw = self.hw
        peers = w.ep - 1
        if peers == 0:
            return 0.0
        local_peers = min(w.ep, hw.devices_per_node) - 1
        intra = nbytes * local_peers / peers
        inter = nbytes - intra
        latency = hw.inter_node_latency_us if inter > 0 else hw.intra_node_latency_us
        return latency * 1e-6 + max(intra / (hw.intra_node_gbps * 1e9), inter / (hw.inter_node_gbps * 1e9))

    def staged_all_to_all(self, w: Workload, nbytes: float, stage: str) -> float:
        """cross: every byte over this device's own network link; node: over NVLink-class links."""
        if nbytes <= 0:
            return 0.0
        hw = self.hw
        if stage == "cross":
            return hw.inter_node_latency_us * 1e-6 + nbytes / (hw.inter_node_gbps * 1e9)
        return hw.intra_node_latency_us * 1e-6 + nbytes / (hw.intra_node_gbps * 1e9)

    def _ring(self, nbytes: float, ranks: int, stride: int, phases: int) -> float:
        """Ring collective over `ranks` ranks `stride` apart; `phases` 2 for all-reduce, 1 for reduce-scatter."""
        if ranks <= 1:
            return 0.0
        crosses_nodes = ranks * stride > self.hw.devices_per_node or stride >= self.hw.devices_per_node
        bw = (self.hw.inter_node_gbps if crosses_nodes else self.hw.intra_node_gbps) * 1e9
        lat = (self.hw.inter_node_latency_us if crosses_nodes else self.hw.intra_node_latency_us) * 1e-6
        return phases * (ranks - 1) * (lat + nbytes / ranks / bw)

    def grad_reduce(self, w: Workload, nbytes: float, expert: bool, mode: str) -> float:
        ranks, stride = (w.dp // w.ep, w.ep) if expert else (w.dp, 1)
        return self._ring(nbytes, ranks, stride, 2 if mode == "all_reduce" else 1)

    def all_gather(self, w: Workload, nbytes: float, expert: bool) -> float:
        ranks, stride = (w.dp // w.ep, w.ep) if expert else (w.dp, 1)
        return self._ring(nbytes, ranks, stride, 1)

    def send(self, w: Workload, nbytes: float, across_machines: bool) -> float:
        hw = self.hw
        if across_machines:
            return hw.inter_node_latency_us * 1e-6 + nbytes / (hw.inter_node_gbps * 1e9)
        return hw.intra_node_latency_us * 1e-6 + nbytes / (hw.intra_node_gbps * 1e9)

    def optimizer(self, w: Workload, mode: str) -> float:
        dense = sum(p.numel for p in w.params if not p.expert)
        expert = sum(p.numel for p in w.params if p.expert)
        # AdamW reads the float32 param and grad and both moments, writes param and moments: 28 bytes a
        # parameter with float32 moments, 20 with bf16 ones (optim.moment_dtype).
        per_param = 12 + 4 * w.moment_bytes
        sharded = per_param * (dense / w.dp + expert * w.ep / w.dp) / (self.hw.memory_gbps * 1e9)
        if mode == "fsdp":  # the shards only; parameters are gathered where they are used
            return sharded
        if mode == "reduce_scatter":  # update a shard, all-gather the parameters back
            return sharded + self.all_gather(w, dense * 4, False) + self.all_gather(w, expert * 4, True)
        return per_param * (dense + expert) / (self.hw.memory_gbps * 1e9)
