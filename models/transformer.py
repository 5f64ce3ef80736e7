"""Decoder-only transformer with interleaved dense and MoE blocks.

Single-device code: it runs in a plain process with no process group. The MoE
blocks return their statistics and losses; nothing is kept on the module.

Shape legend (models/__init__.py): B, T, D, V.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from moeyard.models.block import Block
from moeyard.models.config import ModelConfig
from moeyard.models.document_attention import DocumentSpans
from moeyard.models.float8 import RECIPES, eligible
from moeyard.models.layers import RMSNorm, SwiGLU
from moeyard.models.moe.experts import GroupedExperts
from moeyard.models.moe.layer import MoE, MoEStats
from moeyard.models.mtp import MTPModule, depth_inputs
from moeyard.models.recompute import RecomputeMode, block_checkpoint
from moeyard.models.rope import rope_tables
from moeyard.models.weight_steps import Linear


@dataclass(frozen=True)
class ModelOutput:
    logits_BTV: Optional[Tensor]
    """None when the forward was asked for `hidden_BTD` instead (the loss then projects it in chunks)."""
    aux_loss: Tensor
    """Sum over MoE layers of aux_loss_coef * load-balancing loss."""
    z_loss: Tensor
    """Sum over MoE layers of z_loss_coef * router z-loss."""
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)
    """Per MoE layer, keyed by block index."""
    hidden_BTD: Optional[Tensor] = None
    """The final normed hidden states, with logits=False: `output` turns them into logits. On a pipeline
    stage before the last (keep_stage): its last block's output, for the next stage."""
    mtp_hidden: tuple[Tensor, ...] = ()
    """With mtp=True, per MTP depth k = 1..D: its normed hidden states [B, T - k, D], whose logits (through
    `output`) predict tokens k + 1 places ahead."""


class HeldElsewhere(nn.Module):
    """In place of a block another pipeline stage holds (parallel/pipeline.py): the blocks that stay keep
    their numbering, and with it their parameter names (`layers.5.attn.wq.weight`) and block indices."""

    def forward(self, *args):
        raise RuntimeError("this block is held by another pipeline stage")


def residual_stream(x_BTD: Tensor) -> Tensor:
    """The residual stream's dtype: float32 under autocast on every layout (an embedding table gathered in
    bf16 by FSDP's mixed precision would otherwise start it in bf16), the weights' own dtype without."""
    if torch.is_autocast_enabled(x_BTD.device.type) and x_BTD.dtype != torch.float64:
        return x_BTD.float()
    return x_BTD


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # nn.Linear, not weight_steps.Linear: its weight gradient stays in the input step (deferred, a weight step
        # would hold the logits' gradient)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp_layers))
        self.tie_weights()
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()
        self.recompute_blocks = False
        """Activation checkpointing of every block (set_recompute("full"))."""
        self.held_parts: tuple[range, ...] = (range(cfg.n_layers),)
        """The runs of decoder blocks this model holds: all, or those of a rank's pipeline stages (keep_stage)."""
        self.embedding_copy = False
        """A last pipeline stage's copy of the first stage's embedding (keep_stage)."""

    def keep_stage(self, parts: tuple[range, ...], first: bool, last: bool) -> None:
        """Keep what one rank's pipeline stages run (parallel/pipeline.py), before any memory is allocated:
        the blocks of `parts` (one run of blocks per stage it holds), the embedding where it holds the first
        stage, the final norm, output layer and MTP depths where it holds the last -- which also keeps a copy
        of the embedding where the output layer shares it (tied) or the MTP depths read it
        (`embedding_copy`; the copies' gradients are summed across the two ranks). What stays keeps its
        name; a forward over a part that does not start at block 0 takes the previous stage's output, and
        one that does not end at the last block returns its blocks' output as hidden_BTD."""
        for i in range(self.cfg.n_layers):
            if not any(i in part for part in parts):
                self.layers[i] = HeldElsewhere()
        self.held_parts = parts
        self.embedding_copy = last and not first and (self.cfg.tie_embeddings or len(self.mtp) > 0)
        if not first and not self.embedding_copy:
            self.tok_embeddings = None
        if not last:
            self.norm = self.output = None
            self.mtp = nn.ModuleList()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, std), output projections of residual branches scaled by 1/sqrt(2L).

        Draws from the default generator in a fixed module order, so the same
        seed gives the same model whatever the parallel layout applied later.
        """
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        offsets = offset_parameter_ids(self)
        for name, p in self.named_parameters():
            if id(p) in offsets:
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "w_down.weight", "w_down_EFD")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def tie_weights(self) -> None:
        """model.tie_embeddings: the output layer uses the embedding matrix (again after `to_empty`, which
        gives each module its own new tensor)."""
        if self.cfg.tie_embeddings and self.output is not None and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        if torch.empty(0).is_meta:  # built on the meta device: placeholders, which reset_buffers fills later
            shape = (cfg.max_seq_len, cfg.rope_dim // 2)
            return torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.float32)
        return rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Every buffer's initial value, computed on the device it is on now (a model built on the meta
        device has buffers without values)."""
        cos, sin = self._rope_tables()
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def _segment_tables(self, segment_BT: Tensor, docs: Optional[DocumentSpans]) -> tuple[Tensor, Tensor,
                                                                                          DocumentSpans]:
        position_BT = segment_positions(segment_BT)
        cos, sin = self.rope_cos[position_BT].unsqueeze(1), self.rope_sin[position_BT].unsqueeze(1)
        return cos, sin, docs if docs is not None else DocumentSpans.from_segments(segment_BT)

    def set_recompute(self, mode: RecomputeMode) -> None:
        """Activation checkpointing (models/recompute.py), which changes memory and time, never the result.
        full: each block keeps only its input and runs again in backward (its all-to-alls too, on every rank
        alike); experts: the routed experts keep only their input rows; selective: every block keeps its GEMM
        outputs. Experts keep only their input rows wherever model.moe.recompute_experts says so."""
        self.recompute_blocks = mode == "full"
        for module in self.modules():
            if isinstance(module, (Block, SwiGLU)):
                module.selective = mode == "selective"
            elif isinstance(module, GroupedExperts):
                full = mode == "experts" or self.cfg.moe.recompute_experts
                module.recompute = "full" if full else "selective" if mode == "selective" else "none"

    def set_fp8(self, recipe: str, dispatch: bool = False) -> tuple[int, int]:
        """train.fp8 (models/float8.py): rowwise runs the GEMMs of every linear layer inside the blocks (attention
        and MLA projections, dense and shared FFNs, MTP projections) and the routed experts' forward and
        input-gradient GEMMs in float8 where their widths allow; the embedding, output layer and routers keep
        the compute dtype. `dispatch` (train.fp8_dispatch): FP8 experts get their rows as e4m3 bytes under
        expert parallelism. Returns (layers in FP8, linear and expert layers in the blocks)."""
        if recipe not in RECIPES:
            raise ValueError(f"train.fp8={recipe!r}: use one of {', '.join(RECIPES)}")
        layers = [m for block in self.blocks() if isinstance(block, nn.Module) for m in block.modules()
                  if isinstance(m, (Linear, GroupedExperts))]
        layers += [m.eh_proj for m in self.mtp if isinstance(m, MTPModule)]
        for m in layers:
            widths = (m.in_features, m.out_features) if isinstance(m, Linear) else m.w_gate_EDF.shape[1:]
            m.fp8 = recipe == "rowwise" and eligible(*widths)
            if isinstance(m, GroupedExperts):
                m.fp8_dispatch = m.fp8 and dispatch
        return sum(m.fp8 for m in layers), len(layers)

    def blocks(self) -> Iterator[Block | HeldElsewhere]:
        """The decoder blocks, then the MTP modules' blocks (block index n_layers + k - 1 for depth k)."""
        yield from self.layers
        yield from (m.block for m in self.mtp)

    def moe_layers(self) -> Iterator[tuple[int, MoE]]:
        """The MoE layers this model holds, by block index."""
        for i, block in enumerate(self.blocks()):
            if isinstance(block, Block) and isinstance(block.ffn, MoE):
                yield i, block.ffn

    def position_tables(self, segment_BT: Optional[Tensor], docs: Optional[DocumentSpans] = None
                        ) -> tuple[Tensor, Tensor, Optional[DocumentSpans]]:
        """RoPE tables for the forward, and the documents (None without segments)."""
        if segment_BT is None:
            return self.rope_cos, self.rope_sin, None
        return self._segment_tables(segment_BT, docs)

    def run_layers(self, x_BTD: Tensor, layers: range, cos: Tensor, sin: Tensor, docs: Optional[DocumentSpans],
                   moe_stats: dict[int, MoEStats]) -> Tensor:
        """The decoder blocks `layers` (all of them, or one pipeline stage's), each MoE layer's statistics
        into `moe_stats` under its block index."""
        for i in layers:
            x_BTD, stats = self._run_block(self.layers[i], x_BTD, cos, sin, docs)
            if stats is not None:
                moe_stats[i] = stats
        return x_BTD

    def router_losses(self, moe_stats: dict[int, MoEStats], device: torch.device) -> tuple[Tensor, Tensor]:
        """The weighted balance and z losses of the MoE layers in `moe_stats`, summed once every layer was
        queued (the load sums had time to arrive)."""
        aux_loss = z_loss = torch.zeros((), dtype=torch.float32, device=device)
        for stats in moe_stats.values():
            aux_loss = aux_loss + self.cfg.moe.aux_loss_coef * stats.aux_loss
            z_loss = z_loss + self.cfg.moe.z_loss_coef * stats.z_loss
        return aux_loss, z_loss

    def _run_block(self, block: nn.Module, *args) -> tuple:
        if self.recompute_blocks and torch.is_grad_enabled():
            return block_checkpoint(block, *args)
        return block(*args)

    def _mtp_forward(self, h_BTD: Tensor, emb_BTD: Tensor, cos: Tensor, sin: Tensor,
                     docs: Optional[DocumentSpans], moe_stats: dict[int, MoEStats]) -> tuple[Tensor, ...]:
        """Each MTP depth's normed hidden states, from the last block's output `h_BTD`."""
        normed = []
        for k, module in enumerate(self.mtp, start=1):
            h_BTD, normed_BTD, stats = self._run_block(module, *depth_inputs(k, h_BTD, emb_BTD, cos, sin, docs))
            if stats is not None:
                moe_stats[self.cfg.n_layers + k - 1] = stats
            normed.append(normed_BTD)
        return tuple(normed)

    def forward(self, tokens_BT: Tensor, segment_BT: Optional[Tensor] = None, logits: bool = True,
                docs: Optional[DocumentSpans] = None, mtp: bool = False,
                stage_tokens_BT: Optional[Tensor] = None, blocks: Optional[range] = None) -> ModelOutput:
        """`segment_BT` (packed SFT rows, document-masked pretraining): tokens attend only within their own
        segment, and positions restart at 0 in each, so a packed document computes exactly what it would
        alone; `docs`, the same segments as spans when the caller has them on the host. `logits=False`
        returns the final hidden states instead, for a loss that projects them a chunk at a time. `mtp`: run
        the MTP depths too (model.mtp_layers; training asks for them, evaluation and generation do not).
        `blocks`: the part of a pipeline stage to run (keep_stage; default: the one part held)."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if blocks is None:
            assert len(self.held_parts) == 1, "a model holding several pipeline stages runs one part at a time"
            blocks = self.held_parts[0]
        # A pipeline stage after the first (keep_stage) is given the previous stage's output x_BTD, and the
        # last, for its MTP depths, the token ids too (`stage_tokens_BT`).
        # The last stage holds the final norm: a stage ending at the last block may be followed by one of none.
        first, last = blocks.start == 0, blocks.stop == self.cfg.n_layers and self.norm is not None
        x_BTD = emb_BTD = residual_stream(self.tok_embeddings(tokens_BT)) if first else tokens_BT
        cos, sin, docs = self.position_tables(segment_BT, docs)
        moe_stats: dict[int, MoEStats] = {}
        x_BTD = self.run_layers(x_BTD, blocks, cos, sin, docs, moe_stats)
        if not last:  # a stage before the last: its blocks' output goes to the next stage
            aux_loss, z_loss = self.router_losses(moe_stats, x_BTD.device)
            return ModelOutput(None, aux_loss, z_loss, moe_stats, x_BTD)
        if mtp and self.mtp and not first:
            emb_BTD = self.tok_embeddings(stage_tokens_BT)
        mtp_hidden = self._mtp_forward(x_BTD, emb_BTD, cos, sin, docs, moe_stats) if mtp else ()
        aux_loss, z_loss = self.router_losses(moe_stats, x_BTD.device)
        hidden_BTD = self.norm(x_BTD)
        logits_BTV = self.output(hidden_BTD) if logits else None
        return ModelOutput(logits_BTV, aux_loss, z_loss, moe_stats, None if logits else hidden_BTD, mtp_hidden)


def segment_positions(segment_BT: Tensor) -> Tensor:
    """Position of each token within its segment: 0 where a segment starts."""
    B, T = segment_BT.shape
    index_BT = torch.arange(T, device=segment_BT.device).expand(B, T)
    starts_BT = torch.ones_like(segment_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segment_BT[:, 1:] != segment_BT[:, :-1]
    return index_BT - torch.where(starts_BT, index_BT, 0).cummax(dim=1).values


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the routed experts' stacked weights: the parameters EP shards on dim 0 and reduces over edp
    (every other parameter is dense: replicated, reduced over dp)."""
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def offset_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the additive offsets, which start at 0 and take no weight decay: the parameters each module
    names in its `offset_parameters` (attention sinks, router and expert biases), and every Linear's bias."""
    ids = set()
    for module in model.modules():
        names = (*getattr(module, "offset_parameters", ()), *(("bias",) if isinstance(module, nn.Linear) else ()))
        ids |= {id(p) for name, p in module.named_parameters(recurse=False) if name in names}
    return ids


def copied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters another pipeline stage holds too (a last stage's embedding copy, keep_stage):
    their gradient enters the global norm once, on the stage that holds the original."""
    if isinstance(model, Transformer) and model.embedding_copy:
        return {id(model.tok_embeddings.weight)}
    return set()


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters AdamW leaves undecayed: norm gains (1-D) and offsets (offset_parameter_ids)."""
    return offset_parameter_ids(model) | {id(p) for p in model.parameters() if p.dim() < 2}
