"""Small random Hugging Face models for the interop tests, and the ep=2 forward they run on each rank.

Every parameter is perturbed after transformers' init (which leaves biases at 0 and norm gains at 1), so
a mistake in how biases or q/k norms are laid out shows in the logits.
"""
from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=100.0)


def hf_config(family: str, **overrides):
    import transformers as tf

    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}
    common = {k: v for k, v in SMALL.items() if k != "rope_theta"} | rope | overrides
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # a dense first layer, a shared expert, renormalised top-k, tied embeddings
        return tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=40, mlp_only_layers=[0], norm_topk_prob=True,
                                 tie_word_embeddings=True)
    if family == "qwen3_moe":  # head_dim apart from hidden_size / heads
        return tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                 head_dim=16)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2, pad_token_id=None, eos_token_id=None)
    if family == "deepseek_v3":  # MLA with q LoRA, YaRN, groups, a routed scale, a shared expert, a dense layer
        yarn = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "mscale": 1.0, "mscale_all_dim": 1.0}
        mla = dict(moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
                   kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, routed_scaling_factor=2.5,
                   norm_topk_prob=True, num_nextn_predict_layers=0)
        return tf.DeepseekV3Config(**{**common, "rope_parameters": yarn, **mla, **overrides})
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    raise ValueError(family)


def save_random_model(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():  # DeepSeek-V3's selection biases
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.05)
    model.save_pretrained(out)
    return out


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(tokens).logits


def sharded_logits(rank: int, world: int, ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of this rank's half of `tokens` from the checkpoint loaded with --init's code at ep=world."""
    import torch.distributed as dist

    from moeyard.models import Transformer
    from moeyard.parallel import apply_expert_parallel, build_mesh
    from moeyard.trainer.checkpoint.sharded import load_weights_into
    from moeyard.trainer.checkpoint.weights import init_model_config
    from moeyard.trainer.config import build_config

    cfg = build_config({"model": init_model_config(Path(ckpt))}).model
    pmesh = build_mesh(world, "cpu")
    model = Transformer(cfg).eval()
    apply_expert_parallel(model, pmesh)
    load_weights_into(Path(ckpt), model, pmesh, dist.group.WORLD)
    with torch.no_grad():
        return model(tokens.chunk(world)[rank]).logits_BTV


def moeyard_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a converted checkpoint, loaded whole in this process."""
    from moeyard.models import Transformer
    from moeyard.trainer.checkpoint.sharded import load_full_model
    from moeyard.trainer.checkpoint.weights import init_model_config
    from moeyard.trainer.config import build_config

    model = Transformer(build_config({"model": init_model_config(ckpt)}).model).eval()
    load_full_model(ckpt, model)
    with torch.no_grad():
        return model(tokens).logits_BTV

