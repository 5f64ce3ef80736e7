"""SFT batches for the training loop: conversations -> rows -> each rank's share of every global batch.

Like `TokenBatches`, every rank builds the same rows and the same per-epoch order from the run's seed and
reads its own contiguous slice, so the ranks' slices in rank order are the batch one process would use.
The loss is normalised by the *global* number of counted targets, which each rank knows without a
collective because it knows the whole global batch's masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moeyard.errors import DataError
from moeyard.trainer.config.sections import Config
from moeyard.trainer.data.sft import (
    ByteChatTemplate,
    HFChatTemplate,
    Rows,
    read_conversations,
    split_heldout,
    target_mask,
    to_rows,
)
from moeyard.trainer.data.sft_demo import DEMO, stdlib_def_conversations


@dataclass(frozen=True)
class SFTBatch:
    tokens_BT1: torch.Tensor
    """[rows, seq_len + 1] token ids."""
    mask_BT: torch.Tensor
    """[rows, seq_len] which targets count in the loss (assistant tokens of the same example)."""
    segment_BT1: torch.Tensor
    """[rows, seq_len + 1] example id within the row (0: padding)."""
    global_targets: int
    """Counted targets in the whole global batch, over all ranks."""


def chat_template(cfg: Config) -> ByteChatTemplate | HFChatTemplate:
    return HFChatTemplate(Path(cfg.sft.tokenizer)) if cfg.sft.tokenizer else ByteChatTemplate()


def _tensors(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.tensor(rows.tokens, dtype=torch.int64)
    segment = torch.tensor(rows.segment, dtype=torch.int64)
    return tokens, target_mask(torch.tensor(rows.learn), segment), segment


def conversations_of(cfg: Config) -> tuple[list[list[dict]], list[str], Path]:
    """(conversations, skipped lines, file) of sft.data."""
    path = stdlib_def_conversations() if cfg.sft.data == DEMO else Path(cfg.sft.data)
    if not path.is_file():
        raise DataError(f"sft.data={cfg.sft.data} is not a file: give a JSONL file of conversations")
    return (*read_conversations(path, cfg.sft.skip_malformed), path)


class SFTData:
    """The training and held-out rows of an SFT config, built the same way on every rank."""

    def __init__(self, cfg: Config, log: bool = False) -> None:
        conversations, skipped, path = conversations_of(cfg)
        train, held = split_heldout(conversations, cfg.sft.heldout_fraction, cfg.run.seed)
        if not train:
            raise DataError(f"{path}: sft.heldout_fraction={cfg.sft.heldout_fraction} holds out all "
                            f"{len(conversations)} conversations: lower it or add data")
        template = chat_template(cfg)
        if template.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the chat template's tokenizer has {template.vocab_size} ids, more than "
                            f"model.vocab_size={cfg.model.vocab_size}")
        seq_len = cfg.train.seq_len
        train_rows = to_rows([template.render(c) for c in train], seq_len, cfg.sft.layout, template.pad_id)
        self.train = _tensors(train_rows)
        self.heldout = _tensors(to_rows([template.render(c) for c in held], seq_len, cfg.sft.layout,
                                        template.pad_id)) if held else None
        self.skipped = skipped
        if len(train_rows.tokens) < cfg.global_batch_sequences:
            raise DataError(f"{path}: {len(train)} training conversations make {len(train_rows.tokens)} rows, "
                            f"fewer than one global batch of {cfg.global_batch_sequences}: lower "
                            f"train.global_batch_tokens")
        if log:
            print(f"sft data {path}: {len(train)} conversations in {len(train_rows.tokens)} rows "
                  f"({cfg.sft.layout}), {len(held)} held out, {len(skipped)} malformed lines skipped, "
                  f"{train_rows.truncated} examples cut to {seq_len + 1} tokens", flush=True)
            for problem in skipped[:5]:
                print(f"  skipped {problem}", flush=True)


class SFTBatches:
    """Global batch `step`: rows in a per-epoch shuffled order; this rank's contiguous slice of it."""

    def __init__(self, data: SFTData, global_batch: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.tokens, self.mask, self.segment = data.train
        self.targets_per_row = self.mask.sum(dim=1)
        self.global_batch, self.dp_rank, self.dp_size, self.seed = global_batch, dp_rank, dp_size, seed
        self.steps_per_epoch = len(self.tokens) // global_batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def batch(self, step: int) -> SFTBatch:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.tokens), generator=g)
        rows = self._order[within * self.global_batch:(within + 1) * self.global_batch]
        per_rank = self.global_batch // self.dp_size
        mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return SFTBatch(self.tokens[mine], self.mask[mine], self.segment[mine],
                        int(self.targets_per_row[rows].sum()))


def heldout_share(data: SFTData, dp_rank: int, dp_size: int) -> Optional[SFTBatch]:
    """This rank's held-out rows, padded with empty rows so that every rank runs the same forwards."""
    if data.heldout is None:
        return None
    tokens, mask, segment = data.heldout
    per_rank = -(-len(tokens) // dp_size)
    pad = per_rank * dp_size - len(tokens)
    tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
    mask = torch.cat([mask, torch.zeros(pad, mask.shape[1], dtype=torch.bool)])
    segment = torch.cat([segment, segment[:1].expand(pad, -1)])
    share = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return SFTBatch(tokens[share], mask[share], segment[share], int(mask.sum()))
