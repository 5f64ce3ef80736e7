"""The SFT step on several ranks, against plain backprop of the same global batch in one process."""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from moeyard.trainer.data.sft import ByteChatTemplate, to_rows
from moeyard.trainer.data.sft_batches import SFTBatches, _tensors


def random_conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "x", "loop", "(", ")", ":", "value", "None"]
    return [[{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))},
             {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))}]
            for _ in range(n)]


def sft_rows(seq_len: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    examples = [ByteChatTemplate().render(c) for c in random_conversations(40, seed=3)]
    return _tensors(to_rows(examples, seq_len, layout, ByteChatTemplate.pad_id))


def sft_step_matches_reference(rank: int, world: int, ep: int, layout: str) -> dict:
    """train_step on this rank's SFT rows gives the gradients and loss of the whole global batch's
    assistant-only mean loss, computed by plain backprop with the packed segments in one process."""
    import torch.nn.functional as nnf

    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.parallel import apply_expert_parallel, build_mesh, split_parameters
    from moeyard.parallel.grads.sync import PlainSync
    from moeyard.trainer.step import train_step

    seq_len, global_batch = 32, 4 * world
    cfg = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=seq_len,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, aux_loss_coef=0.0, z_loss_coef=0.0))
    rows = SimpleNamespace(train=sft_rows(seq_len, layout))
    whole = SFTBatches(rows, global_batch, dp_rank=0, dp_size=1, seed=0).batch(1)

    torch.manual_seed(0)
    reference = Transformer(cfg)
    out = reference(whole.tokens_BT1[:, :-1], whole.segment_BT1[:, :-1])
    losses = nnf.cross_entropy(out.logits_BTV.flatten(0, 1), whole.tokens_BT1[:, 1:].flatten(), reduction="none")
    lm = losses[whole.mask_BT.flatten()].mean()
    lm.backward()

    pmesh = build_mesh(ep, "cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_expert_parallel(model, pmesh)
    frozen = PlainSync(split_parameters(model), pmesh, torch.optim.SGD(model.parameters(), lr=0.0))
    mine = SFTBatches(rows, global_batch, dp_rank=pmesh.dp_rank, dp_size=pmesh.dp, seed=0).batch(1)
    assert mine.global_targets == int(whole.mask_BT.sum())
    result = train_step(model, frozen, mine, micro_batch_size=2, pmesh=pmesh, lr=0.0, grad_clip=0.0,
                        dtype=torch.float32)

    local = cfg.moe.num_experts // ep
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if ".experts." in name:
            expected = expected[pmesh.ep_rank * local:(pmesh.ep_rank + 1) * local]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert abs(result.lm_loss - float(lm)) <= 1e-5 * float(lm)
    return {"lm_loss": result.lm_loss, "targets": mine.global_targets}
