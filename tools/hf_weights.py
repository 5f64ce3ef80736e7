"""Hugging Face tensor names and layouts <-> moeyard parameters.

Two layout differences matter. RoPE: HF rotates the pair (x[i], x[i + Q/2]) of a head, moeyard the pair
(x[2i], x[2i+1]); permuting the rows of each head of the query and key projections (and their biases and
norm gains) in the same way turns one into the other without changing any attention score. Experts: HF
stores one [F, D] matrix per expert (or, in newer files, a fused [E, 2F, D] gate_up), moeyard a stacked
[E, D, F] per projection.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from moeyard.errors import ConfigError
from moeyard.models import ModelConfig
from moeyard.tools import hf_gpt_oss as gpt_oss
from moeyard.trainer.checkpoint.store import is_plain_name

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """A safetensors file opened for reading; a missing, truncated or damaged one is named."""
    try:
        handle = safe_open(str(path), "pt")
    except Exception as err:  # safetensors' own error type differs between versions
        raise ConfigError(f"{path} is not a readable safetensors file ({err}): it is missing, truncated or "
                          f"damaged; download or save it again") from None
    with handle as f:
        yield f


def _safetensors_inside(folder: Path, name: object) -> bool:
    """A plain *.safetensors file name right inside `folder` (no separator, no `..`) that is a regular file
    once links are followed: the HF cache's snapshots link into its blobs, a FIFO would block for ever."""
    if not is_plain_name(name) or not str(name).endswith(".safetensors"):
        return False
    try:
        return stat.S_ISREG(os.stat(folder / str(name)).st_mode)
    except OSError:
        return False


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The safetensors dtypes whose values convert to float32 as they are."""


class HFTensors:
    """The safetensors of a save_pretrained folder, read lazily; remembers what was taken. `dry`: `take`
    reads only the header and returns a float32 tensor on the meta device (names and shapes, no data)."""

    def __init__(self, hf_dir: Path, dry: bool = False) -> None:
        self.dry = dry
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                items = list(weight_map.items())
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"{index} is not a safetensors index (JSON with a weight_map): {err!r}") from None
            outside = sorted({str(name) for _, name in items if not _safetensors_inside(hf_dir, name)})
            if outside:
                raise ConfigError(f"{index} maps tensors to {outside[:3]}: every weight_map file must be a "
                                  f"*.safetensors file right inside {hf_dir} (no path, no link out); the index "
                                  f"was edited or belongs elsewhere")
            self.files = {key: hf_dir / name for key, name in items}
        elif (hf_dir / "model.safetensors").is_file():
            with _opened(hf_dir / "model.safetensors") as f:
                self.files = {key: hf_dir / "model.safetensors" for key in f.keys()}
        else:
            pickled = [p.name for p in hf_dir.glob("*.bin")]
            hint = f" (found {', '.join(pickled)}: pickled weights are not read; re-save with " \
                   f"save_pretrained(safe_serialization=True))" if pickled else ""
            raise ConfigError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json{hint}")
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def take(self, key: str) -> Tensor:
        if key not in self.files:
            raise ConfigError(f"tensor {key!r} is missing from the checkpoint: is config.json from the same model?")
        self.taken.add(key)
        with _opened(self.files[key]) as f:
            try:
                stored = f.get_slice(key).get_dtype()
            except Exception as err:  # safetensors' own error type differs between versions
                raise ConfigError(f"{self.files[key]}: tensor {key!r} cannot be read ({err}): the file is "
                                  f"truncated or damaged; download it again") from None
            if stored not in FLOAT_DTYPES:  # integers (or packed quantized blocks) would be converted as numbers
                raise ConfigError(f"{self.files[key]}: tensor {key!r} is stored as {stored}, not floating point: "
                                  f"quantized or integer weights are not read; convert the model to bf16 or "
                                  f"float32 first")
            try:
                if self.dry:
                    return torch.empty(f.get_slice(key).get_shape(), dtype=torch.float32, device="meta")
                return f.get_tensor(key).float()
            except Exception as err:  # safetensors' own error type differs between versions
                raise ConfigError(f"{self.files[key]}: tensor {key!r} cannot be read ({err}): the file is "
                                  f"truncated or damaged; download it again") from None

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.files if k not in self.taken and not k.endswith(IGNORED_SUFFIXES))


def check_embedding(dry: HFTensors, cfg: ModelConfig, hf_dir: Path) -> None:
    """config.json's vocabulary and hidden size held to the embedding's safetensors header, before anything is
    sized from config.json's numbers (a hidden_size of 4e10 would allocate first)."""
    name = "model.embed_tokens.weight"
    if name in dry and tuple(dry.take(name).shape) != (cfg.vocab_size, cfg.dim):
        raise ConfigError(f"{hf_dir / 'config.json'} says vocab_size={cfg.vocab_size}, hidden_size={cfg.dim}, but "
                          f"{name} is {list(dry.take(name).shape)} in the safetensors: config.json belongs to "
                          f"another model, or was edited")


def rope_order(head_dim: int, rotary_dim: int | None = None) -> Tensor:
    """moeyard row r of a head is HF row rope_order[r]; with partial rotary only the first `rotary_dim` rows
    are rotated (in halves by HF), the others kept in place."""
    rotary_dim = rotary_dim or head_dim
    half = torch.arange(rotary_dim // 2)
    rotated = torch.stack([half, half + rotary_dim // 2], dim=1).flatten()
    return torch.cat([rotated, torch.arange(rotary_dim, head_dim)])


def _heads(t: Tensor, n_heads: int, head_dim: int, order: Tensor) -> Tensor:
    return t.reshape(n_heads, head_dim, *t.shape[1:])[:, order].reshape(t.shape)


def _latent_attention_pairs(ours: str, hf: str, cfg: ModelConfig) -> Iterator[tuple[str, str, int]]:
    """MLA's projections; DeepSeek-V3's interleaved RoPE is moeyard's pair layout, so nothing is permuted."""
    if cfg.mla.q_lora_rank is None:
        yield f"{ours}.wq.weight", f"{hf}.q_proj.weight", 0
    else:
        yield f"{ours}.wq_a.weight", f"{hf}.q_a_proj.weight", 0
        yield f"{ours}.q_norm.weight", f"{hf}.q_a_layernorm.weight", 0
        yield f"{ours}.wq_b.weight", f"{hf}.q_b_proj.weight", 0
    yield f"{ours}.wkv_a.weight", f"{hf}.kv_a_proj_with_mqa.weight", 0
    yield f"{ours}.kv_norm.weight", f"{hf}.kv_a_layernorm.weight", 0
    yield f"{ours}.wkv_b.weight", f"{hf}.kv_b_proj.weight", 0
    yield f"{ours}.wo.weight", f"{hf}.o_proj.weight", 0


def block_prefixes(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(moeyard block prefix, HF layer prefix, block index) of every block: the decoder's, then the MTP
    depths' blocks, which DeepSeek-V3 stores as layers n_layers.. (one MTP module per layer)."""
    blocks = [(f"layers.{i}", f"model.layers.{i}", i) for i in range(cfg.n_layers)]
    return blocks + [(f"mtp.{k}.block", f"model.layers.{cfg.n_layers + k}", cfg.n_layers + k)
                     for k in range(cfg.mtp_layers)]


def _attention_pairs(cfg: ModelConfig, block: str, layer: str) -> Iterator[tuple[str, str, int]]:
    """(moeyard name, HF name, heads whose rows are RoPE-permuted: 0 for none)."""
    ours, hf = f"{block}.attn", f"{layer}.self_attn"
    yield f"{block}.attn_norm.weight", f"{layer}.input_layernorm.weight", 0
    yield f"{block}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight", 0
    if cfg.attention == "mla":
        yield from _latent_attention_pairs(ours, hf, cfg)
        return
    yield f"{ours}.wq.weight", f"{hf}.q_proj.weight", cfg.n_heads
    yield f"{ours}.wk.weight", f"{hf}.k_proj.weight", cfg.n_kv_heads
    yield f"{ours}.wv.weight", f"{hf}.v_proj.weight", 0
    yield f"{ours}.wo.weight", f"{hf}.o_proj.weight", 0
    if cfg.attn_bias:
        yield f"{ours}.wq.bias", f"{hf}.q_proj.bias", cfg.n_heads
        yield f"{ours}.wk.bias", f"{hf}.k_proj.bias", cfg.n_kv_heads
        yield f"{ours}.wv.bias", f"{hf}.v_proj.bias", 0
    if cfg.attn_out_bias:
        yield f"{ours}.wo.bias", f"{hf}.o_proj.bias", 0
    if cfg.attention_sinks:
        yield f"{ours}.sinks", f"{hf}.sinks", 0
    if cfg.qk_norm != "none":
        per_head = cfg.qk_norm == "head"
        yield f"{ours}.q_norm.weight", f"{hf}.q_norm.weight", 1 if per_head else cfg.n_heads
        yield f"{ours}.k_norm.weight", f"{hf}.k_norm.weight", 1 if per_head else cfg.n_kv_heads


def _mlp_pairs(ours: str, hf: str, names: tuple[str, str, str]) -> Iterator[tuple[str, str, int]]:
    for our_name, hf_name in zip(("w_gate", "w_up", "w_down"), names):
        yield f"{ours}.{our_name}.weight", f"{hf}.{hf_name}.weight", 0


def _moe_prefix(family: str, layer: str) -> tuple[str, tuple[str, str, str]]:
    if family == "mixtral":
        return f"{layer}.block_sparse_moe", ("w1", "w3", "w2")
    return f"{layer}.mlp", ("gate_proj", "up_proj", "down_proj")


def _mtp_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, int]]:
    """An MTP depth's own tensors beside its block (DeepSeek-V3's names)."""
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.n_layers + k}"
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("norm", "shared_head.norm")):
            yield f"mtp.{k}.{ours}.weight", f"{hf}.{theirs}.weight", 0


def mtp_shared_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(moeyard name, HF name): the copies of the embedding and output layer DeepSeek-V3 stores in each MTP
    layer, which moeyard's depths share with the main model."""
    head = "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"
    copies = []
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.n_layers + k}"
        copies += [("tok_embeddings.weight", f"{hf}.embed_tokens.weight"), (head, f"{hf}.shared_head.head.weight")]
    return copies


def plain_pairs(cfg: ModelConfig, family: str, dense: bool = False) -> Iterator[tuple[str, str, int]]:
    """Every one-to-one tensor (all but the routed experts; router buffers included); `dense`: every layer has a
    dense MLP."""
    yield "tok_embeddings.weight", "model.embed_tokens.weight", 0
    yield "norm.weight", "model.norm.weight", 0
    if not cfg.tie_embeddings:
        yield "output.weight", "lm_head.weight", 0
    for block, layer, i in block_prefixes(cfg):
        yield from _attention_pairs(cfg, block, layer)
        if dense or not cfg.is_moe_layer(i):
            yield from _mlp_pairs(f"{block}.ffn", f"{layer}.mlp", ("gate_proj", "up_proj", "down_proj"))
            continue
        hf, _ = _moe_prefix(family, layer)
        router = "router" if family == "gpt_oss" else "gate"
        yield f"{block}.ffn.router.weight_ED", f"{hf}.{router}.weight", 0
        if cfg.moe.router_bias:
            yield f"{block}.ffn.router.bias_E", f"{hf}.{router}.bias", 0
        if family in ("deepseek_v3", "glm4_moe"):  # the aux-loss-free selection biases: a router buffer
            yield f"{block}.ffn.router.expert_bias_E", f"{hf}.gate.e_score_correction_bias", 0
            if cfg.moe.num_shared_experts:
                yield from _mlp_pairs(f"{block}.ffn.shared_experts", f"{hf}.shared_experts",
                                      ("gate_proj", "up_proj", "down_proj"))
        if cfg.moe.num_shared_experts and family == "qwen2_moe":
            yield from _mlp_pairs(f"{block}.ffn.shared_experts", f"{hf}.shared_expert",
                                  ("gate_proj", "up_proj", "down_proj"))
            if cfg.moe.shared_expert_gate:
                yield f"{block}.ffn.shared_gate.weight", f"{hf}.shared_expert_gate.weight", 0
    yield from _mtp_pairs(cfg)


def _expert_stack(src: HFTensors, hf: str, name: str, num_experts: int) -> Tensor:
    """[E, D, F] (or [E, F, D] for down) from per-expert [F, D] matrices, filled in place: one expert's
    matrix beside the result at a time."""
    first = src.take(f"{hf}.experts.0.{name}.weight").t()
    out = first.new_empty((num_experts, *first.shape))
    out[0] = first
    for e in range(1, num_experts):
        out[e] = src.take(f"{hf}.experts.{e}.{name}.weight").t()
    return out


def _expert_producers(hf: str, names: tuple[str, str, str], num_experts: int,
                      fused: bool) -> list[Callable[[HFTensors], Tensor]]:
    """How to read [gate_EDF, up_EDF, down_EFD], from per-expert matrices or the fused 3-D layout."""
    if fused:
        def gate_up(part: int) -> Callable[[HFTensors], Tensor]:
            return lambda src: src.take(f"{hf}.experts.gate_up_proj").chunk(2, dim=1)[part].transpose(1, 2)
        return [gate_up(0), gate_up(1), lambda src: src.take(f"{hf}.experts.down_proj").transpose(1, 2)]
    return [lambda src, n=n: _expert_stack(src, hf, n, num_experts) for n in names]


def moeyard_producers(src: HFTensors, cfg: ModelConfig, family: str,
                      dense: bool = False) -> dict[str, Callable[[HFTensors], Tensor]]:
    """For each moeyard parameter, how to read it from an HF folder (one parameter at a time; `src` tells
    which expert layout the folder uses). `dense`: a dense model's MLPs in the places of `cfg`'s MoE layers."""
    producers: dict[str, Callable[[HFTensors], Tensor]] = {}
    for ours, hf, heads in plain_pairs(cfg, family, dense):
        def plain(source: HFTensors, hf: str = hf, heads: int = heads) -> Tensor:
            t = source.take(hf)
            if not heads:
                return t
            head_dim = t.shape[0] // heads
            if head_dim * heads != t.shape[0] or cfg.rope_dim > head_dim:  # before rope_order sizes anything
                raise ConfigError(f"{hf} has {t.shape[0]} rows for {heads} heads, which config.json's rotary "
                                  f"dimension {cfg.rope_dim} does not fit: config.json belongs to another model, "
                                  f"or was edited")
            return _heads(t, heads, head_dim, rope_order(head_dim, cfg.rope_dim))
        producers[ours] = plain
    for ours, copy in mtp_shared_copies(cfg):
        producers[ours] = _checking_copy(producers[ours], ours, copy)
    for block, layer, i in block_prefixes(cfg):
        if cfg.is_moe_layer(i) and not dense and family == "gpt_oss":
            producers.update(gpt_oss.expert_producers(_moe_prefix(family, layer)[0], block))
        elif cfg.is_moe_layer(i) and not dense:
            hf, names = _moe_prefix(family, layer)
            fused = f"{hf}.experts.gate_up_proj" in src
            for w, produce in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"),
                                  _expert_producers(hf, names, cfg.moe.num_experts, fused)):
                producers[f"{block}.ffn.experts.{w}"] = produce
    return producers


def _checking_copy(produce: Callable[[HFTensors], Tensor], ours: str, copy: str) -> Callable[[HFTensors], Tensor]:
    """`produce`, which also takes the checkpoint's copy of the tensor and refuses it unless equal."""
    def checked(source: HFTensors) -> Tensor:
        t = produce(source)
        if copy not in source:  # redundant, and some checkpoints leave it out (as GLM-4.6 is reported to)
            return t
        c = source.take(copy)
        if c.shape != t.shape or (not source.dry and not torch.equal(c, t)):
            raise ConfigError(f"{copy} differs from the tensor it copies (moeyard's {ours}): moeyard's MTP depths "
                              f"share the embedding and output layer with the main model, so it cannot import "
                              f"separate ones; set num_nextn_predict_layers=0 and remove model.layers."
                              f"{copy.split('.')[2]}.* to import the main model alone")
        return t
    return checked


def check_hf_tensors(src: HFTensors, producers: dict[str, Callable[[HFTensors], Tensor]], cfg: ModelConfig,
                     family: str) -> dict[str, Tensor]:
    """Run every producer on `src` (dry: shapes only) and refuse tensors the model would not use."""
    state = {name: produce(src) for name, produce in producers.items()}
    if family == "qwen2_moe" and not cfg.moe.num_shared_experts:
        _take_empty_shared_experts(src, cfg)
    if leftovers := src.leftovers():
        mtp = f"model.layers.{cfg.n_layers + cfg.mtp_layers}."
        if family in ("deepseek_v3", "glm4_moe") and any(k.startswith(mtp) for k in leftovers):
            raise ConfigError(f"the checkpoint stores {mtp}* beyond its num_nextn_predict_layers="
                              f"{cfg.mtp_layers} multi-token-prediction modules: set num_nextn_predict_layers in "
                              f"config.json to the MTP layers it stores, or remove those tensors")
        raise ConfigError(f"{len(leftovers)} tensors of the checkpoint have no place in the {family} model built "
                          f"from its config.json, e.g. {leftovers[:3]}")
    return state


def hf_to_moeyard(src: HFTensors, cfg: ModelConfig, family: str, dense: bool = False) -> dict[str, Tensor]:
    """moeyard parameters (full, unsharded) from an HF folder; refuses tensors it would not use.
    `dense`: read a dense model's MLPs (for upcycling) in the places of `cfg`'s MoE layers."""
    return check_hf_tensors(src, moeyard_producers(src, cfg, family, dense), cfg, family)


def _take_empty_shared_experts(src: HFTensors, cfg: ModelConfig) -> None:
    """A Qwen2-MoE with shared_expert_intermediate_size 0 (as moeyard exports a model without shared experts)
    still stores a zero-width shared expert and its gate: they add nothing and are passed over."""
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        prefix = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"{prefix}.shared_expert.{name}.weight"
            if key in src and src.take(key).numel() > 0:
                raise ConfigError(f"{key} has weights but config.json says shared_expert_intermediate_size=0")
        if f"{prefix}.shared_expert_gate.weight" in src:
            src.take(f"{prefix}.shared_expert_gate.weight")


def hf_tensors(cfg: ModelConfig, family: str, read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """HF tensors of `family` (see hf_config.export_family) computing what the moeyard model computes, in a
    fixed order, each made from `read(moeyard name)` when it is reached: one source parameter (one layer's
    stacked experts at most) is held at a time."""
    m = cfg.moe
    for ours, hf, heads in plain_pairs(cfg, family):
        t = read(ours)
        if heads:
            head_dim = t.shape[0] // heads
            t = _heads(t, heads, head_dim, torch.argsort(rope_order(head_dim, cfg.rope_dim)))
        if family == "qwen2_moe" and not m.shared_expert_gate and ours.endswith("shared_experts.w_down.weight"):
            t = 2 * t  # see below: the zero gate halves the shared expert
        yield hf, t.contiguous()
    for ours, copy in mtp_shared_copies(cfg):
        yield copy, read(ours).contiguous()
    for block, layer, i in block_prefixes(cfg):
        if not cfg.is_moe_layer(i):
            continue
        hf, names = _moe_prefix(family, layer)
        if family == "gpt_oss":
            yield from gpt_oss.expert_tensors(hf, block, read)
            continue
        for w, name in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), names):
            stacked = read(f"{block}.ffn.experts.{w}")
            for e in range(m.num_experts):
                yield f"{hf}.experts.{e}.{name}.weight", stacked[e].t().contiguous()
        if family != "qwen2_moe" or m.shared_expert_gate:
            continue
        # Qwen2-MoE always gates its shared expert by sigmoid(x @ g): g = 0 gives exactly 1/2, undone by
        # doubling the down projection; with no shared expert at all, a zero-width one adds nothing.
        yield f"{hf}.shared_expert_gate.weight", torch.zeros(1, cfg.dim)
        if not m.num_shared_experts:
            yield f"{hf}.shared_expert.gate_proj.weight", torch.zeros(0, cfg.dim)
            yield f"{hf}.shared_expert.up_proj.weight", torch.zeros(0, cfg.dim)
            yield f"{hf}.shared_expert.down_proj.weight", torch.zeros(cfg.dim, 0)


def moeyard_to_hf(state: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """All of `hf_tensors` at once, from a state dict."""
    return dict(hf_tensors(cfg, family, state.__getitem__))
