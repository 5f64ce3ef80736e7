"""Bodies of multi-process tests (run through helpers.multiprocess.run_distributed, which spawned workers
import by name); the tests check what they return."""
from __future__ import annotations

import torch

from moeyard.parallel import build_mesh

E, D, F, T, K = 8, 16, 24, 48, 2
HOT, COLD = 3, 5  # the expert that receives most tokens, and the one that receives none


def sigmoid_bias_balances(rank: int, world: int, corpus: str, steps: int, rate: float, skew: float,
                          seq: int, per_rank: int) -> dict:
    """Train the tiny config with sigmoid_bias routing from a deliberately skewed router (experts 0 and 1
    favoured by every token) and report the worst layer's max/mean expert load over the steps."""
    import numpy as np

    from moeyard import configs
    from moeyard.models import Transformer
    from moeyard.parallel import apply_expert_parallel, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.config.sections import read_config
    from moeyard.trainer.data.tokens import read_meta
    from moeyard.trainer.metrics import load_summary
    from moeyard.trainer.step import train_step

    cfg = read_config(configs.path("tiny.yaml"), [
        "model.moe.router=sigmoid_bias", f"model.moe.bias_update_rate={rate}", "model.moe.aux_loss_coef=0",
        f"parallel.ep={world}", "model.n_layers=3"]).model  # two MoE layers: a worst of layers, at 3/4 the compute
    meta = read_meta(__import__("pathlib").Path(corpus))
    stream = np.fromfile(f"{corpus}/{meta['shards'][0]['file']}", dtype=np.uint16)
    starts = np.random.default_rng(0).integers(0, len(stream) - seq - 1, size=(steps, world * per_rank))

    torch.manual_seed(0)
    model = Transformer(cfg)
    captured = []
    hooks = [moe.router.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
             for _, moe in model.moe_layers()]
    with torch.no_grad():
        model(torch.from_numpy(stream[:seq].astype(np.int64)).view(1, -1))
        for (_, moe), x in zip(model.moe_layers(), captured):
            mean_D = x.reshape(-1, x.shape[-1]).mean(dim=0)
            skew_E = torch.zeros(cfg.moe.num_experts)
            skew_E[:2] = skew  # the average token's logit rises by `skew` for experts 0 and 1
            moe.router.weight_ED += skew_E[:, None] * mean_D[None, :] / mean_D.square().sum()
    for hook in hooks:
        hook.remove()

    pmesh = build_mesh(world, "cpu")
    apply_expert_parallel(model, pmesh)
    sync = PlainSync(split_parameters(model), pmesh, torch.optim.AdamW(model.parameters(), lr=1e-3))
    worst, loads = [], []
    for step in range(steps):
        rows = [stream[s:s + seq + 1].astype(np.int64) for s in starts[step, rank * per_rank:(rank + 1) * per_rank]]
        result = train_step(model, sync, torch.from_numpy(np.stack(rows)), micro_batch_size=per_rank, pmesh=pmesh,
                            lr=1e-3, grad_clip=1.0, dtype=torch.float32)
        worst.append(max(load_summary(c)["max_over_mean"] for c in result.expert_load.values()))
        loads.append({layer: list(c) for layer, c in result.expert_load.items()})
    biases = {layer: moe.router.expert_bias_E.tolist() for layer, moe in model.moe_layers()}
    return {"worst_max_over_mean": worst, "biases": biases, "loads": loads}
