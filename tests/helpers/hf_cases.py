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
    if family == "glm4_moe":  # partial rotary, per-head q/k norm, q/k/v biases, DeepSeek's router over groups
        rope = {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}
        glm = dict(head_dim=12, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                   n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=0)
        return tf.Glm4MoeConfig(**{**common, "rope_parameters": rope, **glm, **overrides})
    if family == "gpt_oss":  # sinks, sliding window 5 on layers 0 and 2 (T = 24), all biases, an active clamp
        yarn = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
        oss = dict(intermediate_size=16, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.3,
                   attention_bias=True)
        return tf.GptOssConfig(**{**common, "rope_parameters": yarn, **oss, **overrides})
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
    from moeyard.trainer.config.resolve import init_model_config
    from moeyard.trainer.config.sections import build_config

    cfg = build_config({"model": init_model_config(Path(ckpt))}).model
    pmesh = build_mesh(world, "cpu")
    model = Transformer(cfg).eval()
    apply_expert_parallel(model, pmesh)
    load_weights_into(Path(ckpt), model, pmesh, dist.group.WORLD)
    with torch.no_grad():
        return model(tokens.chunk(world)[rank]).logits_BTV


def moeyard_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a converted checkpoint, loaded whole in this process."""
    from moeyard.models import build_model
    from moeyard.trainer.checkpoint.sharded import load_full_model
    from moeyard.trainer.config.resolve import init_model_config
    from moeyard.trainer.config.sections import build_config

    model = build_model(build_config({"model": init_model_config(ckpt)}).model).eval()
    load_full_model(ckpt, model)
    with torch.no_grad():
        return model(tokens).logits_BTV



def save_deepseek_with_mtp(out: Path, seed: int = 0) -> Path:
    """A random DeepSeek-V3 folder (3 layers) that stores one MTP module as layer 3, the way DeepSeek-V3's own
    checkpoint does: a full decoder layer plus enorm, hnorm, eh_proj, shared_head.norm, and copies of the
    embedding and output layer. Also writes `out`/../mtp-layer-as-model: a 1-layer DeepseekV3ForCausalLM made of
    the MTP module's block, norm and head, which computes the MTP depth from its inputs_embeds (the reference)."""
    import json

    from safetensors.torch import load_file, save_file

    full = save_random_model("deepseek_v3", out.parent / "four-layers", seed=seed, num_hidden_layers=4)
    tensors = load_file(full / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    d = tensors["model.norm.weight"].numel()
    mtp = "model.layers.3"
    tensors |= {f"{mtp}.enorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
                f"{mtp}.hnorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
                f"{mtp}.eh_proj.weight": 0.1 * torch.randn(d, 2 * d, generator=g),
                f"{mtp}.shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
                f"{mtp}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                f"{mtp}.shared_head.head.weight": tensors["lm_head.weight"].clone()}
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((full / "config.json").read_text()) | {"num_hidden_layers": 3, "num_nextn_predict_layers": 1}
    (out / "config.json").write_text(json.dumps(config))

    layer = out.parent / "mtp-layer-as-model"
    layer.mkdir()
    block = {k.replace(f"{mtp}.", "model.layers.0."): v for k, v in tensors.items()
             if k.startswith(f"{mtp}.") and k.split(".")[3] not in ("enorm", "hnorm", "eh_proj", "shared_head",
                                                                      "embed_tokens")}
    block |= {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"],
              "model.norm.weight": tensors[f"{mtp}.shared_head.norm.weight"],
              "lm_head.weight": tensors[f"{mtp}.shared_head.head.weight"]}
    save_file(block, layer / "model.safetensors", metadata={"format": "pt"})
    (layer / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1, "first_k_dense_replace": 0,
                                                            "num_nextn_predict_layers": 0}))
    return out


def mtp_reference_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Depth 1's logits from transformers' own modules: the main model's last decoder layer output h (before the
    final norm), then the MTP layer-as-model on eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    main = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    layer = AutoModelForCausalLM.from_pretrained(hf_dir.parent / "mtp-layer-as-model").eval()
    t = load_file(hf_dir / "model.safetensors")
    kept = {}
    main.model.layers[-1].register_forward_hook(lambda m, args, out: kept.update(h=out[0] if isinstance(out, tuple)
                                                                                    else out))
    with torch.no_grad():
        main(tokens)
        h, emb = kept["h"], main.model.embed_tokens(tokens)
        eps = main.config.rms_norm_eps

        def norm(x: torch.Tensor, name: str) -> torch.Tensor:
            return F.rms_norm(x, (x.shape[-1],), t[f"model.layers.3.{name}.weight"], eps)

        joined = torch.cat([norm(emb[:, 1:], "enorm"), norm(h[:, :-1], "hnorm")], dim=-1)
        return layer(inputs_embeds=joined @ t["model.layers.3.eh_proj.weight"].t()).logits
