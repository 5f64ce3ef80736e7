"""What one optimizer step reports, gathered by name: losses, per-layer expert loads, adapter routers.

Every number is a sum (float64, or int64 for counts) over this rank's micro-steps, kept under a name. The
sums that differ per rank (losses, router losses and entropies) are summed over
dp in one all-reduce of one packed buffer; the expert counts are already global
(each MoE layer sums its counts over the batch). Both are read back to the host in
one transfer each and unpacked by name, never by position.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moeyard.models import MoEStats
from moeyard.models.peft.adapters import AdapterStats


class NamedSums:
    """Named sums of one dtype, packed into one buffer for a collective or a host transfer."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.values: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().to(self.dtype).reshape(-1)
        self.values[name] = self.values[name] + value if name in self.values else value

    def _unpack(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.values, flat.split([v.numel() for v in self.values.values()])))

    def all_reduce(self, group: dist.ProcessGroup) -> None:
        """Sum every value over `group` in one collective (every rank adds the same names in the same order)."""
        if not self.values:
            return
        flat = torch.cat(list(self.values.values()))
        dist.all_reduce(flat, group=group)
        self.values = self._unpack(flat)

    def to_host(self) -> dict[str, list]:
        """Every value as a Python list, in one device-to-host transfer."""
        if not self.values:
            return {}
        return {name: v.tolist() for name, v in self._unpack(torch.cat(list(self.values.values())).cpu()).items()}


class StepStats:
    """Accumulates the model outputs of one step's micro-steps on this rank."""

    def __init__(self) -> None:
        self.per_rank = NamedSums(torch.float64)
        """Sums that differ per rank: reduced over dp by `all_reduce`."""
        self.counts = NamedSums(torch.int64)
        """Expert counts: the MoE layer already summed them over the batch."""
        self.moe_layers: list[int] = []
        self.adapters: list[str] = []

    def add_lm(self, lm_sum: Tensor, mtp_sum: Optional[Tensor] = None) -> None:
        """A micro-batch's summed next-token (and MTP) loss: the last pipeline stage's."""
        self.per_rank.add("lm_loss", lm_sum)
        if mtp_sum is not None:
            self.per_rank.add("mtp_loss", mtp_sum)

    def add_forward(self, moe_stats: dict[int, MoEStats], adapter_stats: dict[str, AdapterStats], aux_loss: Tensor,
                    z_loss: Tensor) -> None:
        """What a micro-batch's forward (or one pipeline stage's part of it) reports."""
        self.per_rank.add("aux_loss", aux_loss)
        self.per_rank.add("z_loss", z_loss)
        for layer, stats in moe_stats.items():
            self.counts.add(f"{layer}.load", stats.tokens_per_expert_E)
            self.counts.add(f"{layer}.dropped", stats.dropped)
            self.counts.add(f"{layer}.unrouted", stats.unrouted)
            for key in ("aux_loss", "z_loss", "entropy"):
                self.per_rank.add(f"{layer}.{key}", getattr(stats, key))
            if stats.nodes_per_token is not None:
                self.per_rank.add(f"{layer}.nodes_per_token", stats.nodes_per_token)
            if layer not in self.moe_layers:
                self.moe_layers.append(layer)
        for name, stats in adapter_stats.items():
            for key in ("load_E", "aux_loss", "entropy"):
                self.per_rank.add(f"{name}.{key}", getattr(stats, key))
            if name not in self.adapters:
                self.adapters.append(name)

    def all_reduce(self, group: dist.ProcessGroup) -> None:
        self.per_rank.all_reduce(group)

    def merge_stages(self, pp_group: dist.ProcessGroup, router_state: dict[int, dict]) -> dict[int, dict]:
        """Pipeline stages hold different layers (and only the last the language-model loss): after the dp
        reduction, give every rank every stage's sums, summed by name, and return every stage's router
        state. One object all-gather per step (a host round trip), over the pp group."""
        mine = ({k: v.cpu() for k, v in self.per_rank.values.items()},
                {k: v.cpu() for k, v in self.counts.values.items()}, self.moe_layers, self.adapters, router_state)
        stages: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, mine, group=pp_group)
        device = next(iter(self.per_rank.values.values())).device
        merged_router: dict[int, dict] = {}
        self.per_rank.values, self.counts.values, self.moe_layers, self.adapters = {}, {}, [], []
        for per_rank, counts, moe_layers, adapters, state in stages:
            for name, value in per_rank.items():
                self.per_rank.add(name, value.to(device))
            for name, value in counts.items():
                self.counts.add(name, value.to(device))
            self.moe_layers += [layer for layer in moe_layers if layer not in self.moe_layers]
            self.adapters += [name for name in adapters if name not in self.adapters]
            merged_router.update(state)
        return merged_router

    def losses_finite(self) -> bool:
        """Whether this step's summed losses are finite (a host sync; the same answer on every rank)."""
        losses = torch.cat([self.per_rank.values[k] for k in ("lm_loss", "aux_loss", "z_loss", "mtp_loss")
                            if k in self.per_rank.values])
        return bool(torch.isfinite(losses).all())

    def expert_load(self, layer: int) -> Tensor:
        """Copies routed to each expert of a MoE layer over the global batch, on the device."""
        return self.counts.values[f"{layer}.load"]

    def report(self, micro_steps: int, global_targets: int, global_tokens: int,
               router_state: dict[int, dict]) -> dict:
        """The step's numbers as StepResult fields: losses are means over the global batch (LM: over the
        learned targets; router losses: over all micro-steps of all ranks)."""
        sums, counts = self.per_rank.to_host(), self.counts.to_host()
        out: dict = {
            "lm_loss": sums["lm_loss"][0] / global_targets,
            "aux_loss": sums["aux_loss"][0] / micro_steps,
            "z_loss": sums["z_loss"][0] / micro_steps,
            **({"mtp_loss": sums["mtp_loss"][0] / global_targets} if "mtp_loss" in sums else {}),
            "expert_load": {}, "dropped_fraction": {}, "unrouted_fraction": {}, "router": {}, "adapter_routers": {},
        }
        for layer in self.moe_layers:
            load = counts[f"{layer}.load"]
            out["expert_load"][layer] = load
            out["dropped_fraction"][layer] = counts[f"{layer}.dropped"][0] / max(1, sum(load))
            out["unrouted_fraction"][layer] = counts[f"{layer}.unrouted"][0] / global_tokens
            out["router"][layer] = {key: sums[f"{layer}.{key}"][0] / micro_steps
                                    for key in ("aux_loss", "z_loss", "entropy", "nodes_per_token")
                                    if f"{layer}.{key}" in sums} | router_state.get(layer, {})
            if f"{layer}.cross_machine_bytes" in sums:  # every rank's dispatches, forward (and recompute)
                out["router"][layer]["cross_machine_mb"] = sums[f"{layer}.cross_machine_bytes"][0] / 2**20
        for name in self.adapters:
            out["adapter_routers"][name] = {"load": [int(v) for v in sums[f"{name}.load_E"]],
                                            "aux_loss": sums[f"{name}.aux_loss"][0] / micro_steps,
                                            "entropy": sums[f"{name}.entropy"][0] / micro_steps}
        return out
