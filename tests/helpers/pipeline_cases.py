"""Bodies of multi-process tests of pipeline stages (run through helpers.multiprocess.run_distributed): a few
optimizer steps built the way the training loop builds them, at any layout, reporting what the tests
compare with the one-process run."""
from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.collective_counts import counting_collectives

SEQ, VOCAB = 16, 64


def _config(overrides: tuple[str, ...]):
    from moeyard.trainer.config.sections import read_config

    base = ("model.vocab_size=64", "model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=64", "model.max_seq_len=16", "model.tie_embeddings=false", "model.moe.num_experts=8",
            "model.moe.top_k=2", "model.moe.ffn_dim=32", "model.moe.first_dense_layers=1",
            "model.moe.num_shared_experts=1", "model.moe.z_loss_coef=0.001",
            "model.moe.balance_loss=sequence", f"train.seq_len={SEQ}",
            f"train.global_batch_tokens={8 * SEQ}", "train.steps=6", "optim.warmup_steps=2",
            # optim's default rate: at 0.01 the 6 steps are chaotic on this model (a float rounding in one
            # stage's dp sum grew 3x a step, to 1.1e-5 in the grad norm by step 5 on an AVX-512 CPU); at
            # 3e-3 the drift stays under 3e-7
            "optim.lr=0.003", "optim.min_lr=0.0003",
            "data.source=python-stdlib", "parallel.timeout_s=60")
    return read_config(None, base + tuple(overrides))


def _full_parameters(model, pmesh) -> dict:
    """This rank's stage's parameters as the one-process model holds them (experts of every ep rank, FSDP
    shards gathered)."""
    from torch.distributed.tensor import DTensor

    from moeyard.models import expert_parameter_ids

    experts = expert_parameter_ids(model)
    full = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if id(p) in experts and pmesh.ep > 1:
            pieces = [torch.empty_like(t) for _ in range(pmesh.ep)]
            dist.all_gather(pieces, t.contiguous(), group=pmesh.ep_group)
            t = torch.cat(pieces)
        full[name] = t.detach().numpy().copy()  # by value: a tensor would travel as a shared-memory handle
    return full


def _sft_batch(tokens_BT1: torch.Tensor, seed: int):
    """Packed rows of two examples each (segments 1 and 2), a random half of the targets counted."""
    from moeyard.trainer.data.sft_batches import SFTBatch

    rows = tokens_BT1.shape[0]
    segment_BT1 = torch.tensor([1] * 9 + [2] * (SEQ + 1 - 9)).expand(rows, -1).contiguous()
    mask_BT = torch.rand(rows, SEQ, generator=torch.Generator().manual_seed(seed)) < 0.5
    return SFTBatch(tokens_BT1, mask_BT, segment_BT1, int(mask_BT.sum()))


def _share(batch, dp_rank: int, rows: int):
    from moeyard.trainer.data.sft_batches import SFTBatch

    if isinstance(batch, torch.Tensor):
        return batch[dp_rank * rows:(dp_rank + 1) * rows]
    cut = slice(dp_rank * rows, (dp_rank + 1) * rows)
    return SFTBatch(batch.tokens_BT1[cut], batch.mask_BT[cut], batch.segment_BT1[cut], batch.global_targets)


def _weight_gemms(model) -> int:
    """Weight-gradient GEMMs a micro-batch's backward on this rank can leave to a weight step
    (models/weight_steps.py): one per trained linear layer of the blocks and MTP depths (not the output
    layer's) and one per expert loop."""
    from moeyard.models.weight_steps import Linear

    linears = sum(1 for m in model.modules() if isinstance(m, Linear) and m.weight.requires_grad)
    return linears + sum(1 for _ in model.moe_layers())


def train_steps(rank: int, world: int, overrides: tuple[str, ...], steps: int = 6, sft: bool = False) -> dict:
    """`steps` optimizer steps on random batches (packed SFT rows with `sft`), built as trainer.loop builds a
    run, then the held-out loss of an SFT batch; returns the step results, the held-out loss and (from each
    stage's first dp rank) what the steps changed in the stage's parameters."""
    from moeyard.parallel import lanes
    from moeyard.trainer.loop import build_rank_model
    from moeyard.trainer.lr_schedule import lr_at
    from moeyard.trainer.scheduler.run_planning import plan_for, run_mesh
    from moeyard.trainer.step import heldout_loss, pipeline_for, train_step

    cfg = _config(overrides)
    device = torch.device("cpu")
    pmesh = run_mesh(cfg, "cpu")
    plan = plan_for(cfg, pmesh, device)
    model, sync = build_rank_model(cfg, pmesh, plan, device)
    pipeline = pipeline_for(model, pmesh, cfg, device) \
        if pmesh.pp > 1 else None
    initial = _full_parameters(model, pmesh)
    rows = cfg.global_batch_sequences // pmesh.dp
    mbs = cfg.train.micro_batch_size or rows
    results = []
    for step in range(steps):
        batch = torch.randint(0, VOCAB, (cfg.global_batch_sequences, SEQ + 1),
                              generator=torch.Generator().manual_seed(100 + step))
        share = _share(_sft_batch(batch, step) if sft else batch, pmesh.dp_rank, rows)
        with counting_collectives() as counts, lanes.trace() as trace:
            r = train_step(model, sync, share, micro_batch_size=mbs, pmesh=pmesh, lr=lr_at(step, steps, cfg.optim),
                           grad_clip=cfg.train.grad_clip, dtype=torch.float32,
                           loss_chunk_tokens=cfg.train.loss_chunk_tokens, pipeline=pipeline)
        results.append({"loss": r.loss, "lm_loss": r.lm_loss, "aux_loss": r.aux_loss, "z_loss": r.z_loss,
                        "grad_norm": r.grad_norm, "mtp_loss": r.mtp_loss or 0.0, "expert_load": r.expert_load,
                        "router": r.router, "gathers": counts["all_gather_single"],
                        "reductions": counts["reduce_scatter_single"],
                        "a2a_s": {lane: trace.a2a_seconds(lane) for lane in ("forward", "backward")},
                        "hidden_s": {lane: trace.hidden_seconds(lane) for lane in ("forward", "backward")},
                        "weight_step_gemms": pipeline.weight_steps.ran if pipeline is not None else 0})
    heldout = _sft_batch(torch.randint(0, VOCAB, (cfg.global_batch_sequences, SEQ + 1),
                                       generator=torch.Generator().manual_seed(99)), 99)
    heldout, skipped = heldout_loss(model, _share(heldout, pmesh.dp_rank, rows), micro_batch_size=mbs, pmesh=pmesh,
                                    dtype=torch.float32, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                                    pipeline=pipeline)
    final = _full_parameters(model, pmesh)
    updates = {name: final[name] - initial[name] for name in final} if pmesh.dp_rank == 0 else {}
    from torch.distributed.fsdp import FSDPModule
    # FSDP units with parameters of their own (a V's middle rank holds neither end: its root has none) on a mesh of
    # more than one rank (a unit over one rank calls no collective)
    fsdp_units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def own(unit) -> list:
        inner = {id(p) for m in fsdp_units if m is not unit and m in set(unit.modules()) for p in m.parameters()}
        return [p for p in unit.parameters() if id(p) not in inner]
    units = sum(bool(mine := own(m)) and mine[0].device_mesh.size() > 1 for m in fsdp_units)
    fsdp = "none" if plan.grad_sync != "fsdp" else "per micro-step" if not plan.gather_once else \
        "gathered once" if plan.reduce_once_on(pmesh.pp_rank) else "resident weights"  # as planned, on this rank
    return {"steps": results, "heldout": heldout, "stage": pmesh.pp_rank, "updates": updates, "fsdp": fsdp,
            "fsdp_units": units, "micro_batches": rows // mbs, "stages_per_rank": cfg.stages_per_rank,
            "weight_gemms": _weight_gemms(model),
            "plan": f"{plan.source}: {plan.summary()}"}
