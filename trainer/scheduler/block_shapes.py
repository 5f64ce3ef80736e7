"""What one block computes and moves, from the model config: the cost and memory models' shared counts.

Blocks are numbered as the model runs them: the decoder blocks 0..n_layers-1, then the MTP depths' blocks
(model.mtp_layers), each of which also joins its two inputs through eh_proj. Attention is grouped-query or
multi-head latent (MLA: low-rank query, compressed KV expanded per head, a RoPE key shared by the heads).
"""
from __future__ import annotations

from dataclasses import dataclass

from moeyard.models import ModelConfig, expert_parameter_ids
from moeyard.models.meta_init import shapes_only
from moeyard.models.weight_steps import Linear


@dataclass(frozen=True)
class AttentionShape:
    projection_weights: int
    """Weight elements of the attention's linear maps (FLOPs = 2 x tokens x this)."""
    q: int
    """Query width over all heads (the scores' reduction size per head, times the heads)."""
    k: int
    """Key width over all heads after expansion (MLA: every head's nope part and the shared RoPE part)."""
    v: int
    """Value width as stored (GQA: the kv heads'; MLA: every head's)."""
    out: int
    """The weighted sum's output width over the query heads (the output projection's input)."""
    rope: int
    """Elements RoPE rotates per token (queries and keys)."""
    latent: int
    """Per-token widths that only MLA has: the q and kv latents, normed before expansion."""


def attention_shape(cfg: ModelConfig) -> AttentionShape:
    d, h = cfg.dim, cfg.n_heads
    if cfg.attention == "gqa":
        q, kv = h * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return AttentionShape(d * (q + 2 * kv) + q * d, q, kv, kv, q, q + kv, 0)
    m = cfg.mla
    q = h * m.qk_head_dim
    query = d * q if m.q_lora_rank is None else d * m.q_lora_rank + m.q_lora_rank * q
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    latent = m.kv_lora_rank + (m.q_lora_rank or 0)
    v = h * m.v_head_dim
    return AttentionShape(query + kv + v * d, q, q, v, v, (h + 1) * m.qk_rope_head_dim, latent)


def block_index(name: str, cfg: ModelConfig) -> int:
    """The block a parameter belongs to: -1 for the embedding, n_blocks for the final norm and output layer."""
    parts = name.split(".")
    if parts[0] == "tok_embeddings":
        return -1
    if parts[0] == "layers":
        return int(parts[1])
    if parts[0] == "mtp":
        return cfg.n_layers + int(parts[1])
    return cfg.n_blocks


def attention_core_flops(cfg: ModelConfig, tokens: int, seq_len: int, layer: int) -> float:
    """Scores and weighted sum of one block's attention: causal, a query sees seq_len / 2 keys on average, or
    at most its sliding window's (GPT-OSS's sliding layers)."""
    a = attention_shape(cfg)
    keys = seq_len / 2
    window = cfg.window_for_layer(layer)
    if 0 < window < seq_len:  # query i sees min(i + 1, window) keys
        keys = window - (window * window - window) / (2 * seq_len)
    return float(2 * tokens * keys * (a.q + a.out))


def block_fwd_flops(cfg: ModelConfig, tokens: int, seq_len: int, layer: int) -> float:
    """Forward FLOPs of one block without its routed experts (which the cost model times separately)."""
    d = cfg.dim
    flops = 2 * tokens * attention_shape(cfg).projection_weights + attention_core_flops(cfg, tokens, seq_len, layer)
    if cfg.is_moe_layer(layer):
        flops += 2 * tokens * d * cfg.moe_for_layer(layer).num_experts  # router
        flops += 6 * tokens * d * cfg.moe.shared_hidden_dim
    else:
        flops += 6 * tokens * d * cfg.ffn_dim
    if layer >= cfg.n_layers:
        flops += 2 * tokens * 2 * d * d  # an MTP depth's eh_proj
    return float(flops)


def head_fwd_flops(cfg: ModelConfig, tokens: int) -> float:
    """The output layer's forward: once for the next token, once per MTP depth (each with k fewer rows)."""
    return 2.0 * tokens * cfg.dim * cfg.vocab_size * (1 + cfg.mtp_layers)


def block_elementwise_bytes(cfg: ModelConfig, tokens: int, layer: int, act_bytes: int) -> float:
    """Forward bytes of one block's memory-bound kernels (each reads its inputs and writes its output once)."""
    d, a = cfg.dim, attention_shape(cfg)
    elements = 4 * d + 6 * d + 2 * a.rope + 2 * a.latent  # two RMSNorms, two residual adds, RoPE, latent norms
    if cfg.is_moe_layer(layer):
        moe = cfg.moe_for_layer(layer)
        elements += moe.top_k * (4 * d + 3 * moe.ffn_dim)  # permute and combine the copies; SwiGLU product
        elements += 3 * moe.shared_hidden_dim if moe.num_shared_experts else 0
    else:
        elements += 3 * cfg.ffn_dim
    if layer >= cfg.n_layers:
        elements += 2 * 2 * d + 2 * 2 * d  # an MTP depth's two input norms and their concatenation
    return float(tokens * elements * act_bytes)


_SHAPES: dict[str, tuple[tuple[str, tuple[int, ...], bool], ...]] = {}


def parameter_shapes(cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """(name, global shape, expert?) of every parameter, from one meta-device build per model config (a
    planner weighing many layouts of a 671B model counts its stages hundreds of times)."""
    key = repr(cfg)
    if key not in _SHAPES:
        model = shapes_only(cfg)
        expert_ids = expert_parameter_ids(model)
        _SHAPES[key] = tuple((name, tuple(p.shape), id(p) in expert_ids) for name, p in model.named_parameters())
    return _SHAPES[key]


_FP8: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {}


def fp8_linear_widths(cfg: ModelConfig) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(input, output) widths of the linear layers train.fp8=rowwise runs in FP8, per block (decoder blocks,
    then MTP depths with their eh_proj): the choice Transformer.set_fp8 makes, read off one meta-device build.
    The routed experts' choice is eligible(dim, moe.ffn_dim) (Workload.fp8_experts)."""
    key = repr(cfg)
    if key not in _FP8:
        model = shapes_only(cfg)
        model.set_fp8("rowwise")
        owners = [*model.layers, *model.mtp]  # an MTP depth owns its eh_proj and its block
        _FP8[key] = tuple(tuple((m.in_features, m.out_features) for m in owner.modules()
                                if isinstance(m, Linear) and m.fp8) for owner in owners)
    return _FP8[key]
