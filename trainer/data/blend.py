"""Per-rank batches from one prepared corpus or a weighted blend of several.

Each corpus is cut into windows of seq_len + 1 tokens (never crossing a shard) and shuffled once per
epoch with the run's seed. Global sample k of the run is drawn from the source furthest behind its share
(the largest w_i * k - drawn_i, Megatron-Core's blending rule): over any stretch of samples each source
gets its weight's share to within one sample, with no randomness to average out. Each data-parallel rank
takes its contiguous slice of every global batch, so the slices are disjoint and, in rank order, exactly
the batch one process would use: the same batches at any world size.

Which window comes next depends on what was drawn before, so the position (`DataPosition`) is part of
every checkpoint; resuming restores it and continues with the batches the uninterrupted run would have had.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from moeyard.errors import DataError
from moeyard.trainer.data.tokens import check_corpus_size, index_problem, read_meta, windows


@dataclass(frozen=True)
class CorpusSource:
    name: str
    dir: Path
    weight: float = 1.0


@dataclass(frozen=True)
class TokenBatch:
    tokens_BT1: torch.Tensor
    """[rows, seq_len + 1] int64 token ids."""
    segment_BT1: Optional[torch.Tensor] = None
    """[rows, seq_len + 1] document id of each token within its row (data.document_mask), else None."""


@dataclass
class DataPosition:
    """Where the run is in its data: samples drawn in all, and from each source (by name). `since_*`:
    the same at the point the current blend weights took effect (shares are counted from there)."""

    samples: int = 0
    drawn: dict[str, int] = field(default_factory=dict)
    since_samples: int = 0
    since_drawn: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    """The blend's weights (normalised) that drew these samples."""

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "drawn": dict(self.drawn), "since_samples": self.since_samples,
                "since_drawn": dict(self.since_drawn), "weights": dict(self.weights)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "DataPosition":
        """From a checkpoint manifest (written by to_dict); DataError if it is not one."""
        try:
            return DataPosition(int(data["samples"]), {str(k): int(v) for k, v in data["drawn"].items()},
                                int(data["since_samples"]), {str(k): int(v) for k, v in data["since_drawn"].items()},
                                {str(k): float(v) for k, v in data["weights"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"the checkpoint's data position is malformed ({err!r}): resume from another "
                            f"checkpoint") from None


class SourceWindows:
    """One corpus's windows, in a shuffled order per epoch; an epoch is a whole number of global batches
    when the corpus holds at least one (the few windows left over change from epoch to epoch)."""

    def __init__(self, source: CorpusSource, seq_len: int, global_batch: int, seed: int, salt: int) -> None:
        meta = read_meta(source.dir)
        self.meta, self.name, self.dir = meta, source.name, source.dir
        self.vocab_size: int = meta["vocab_size"]
        dtype = np.dtype(meta["dtype"])
        self.shards = [np.memmap(source.dir / s["file"], dtype=dtype, mode="r") for s in meta["shards"]]
        self.starts = [np.memmap(source.dir / s["index"], dtype=np.int64, mode="r") for s in meta["shards"]]
        self.seq_len, self.window = seq_len, seq_len + 1
        self.offsets = np.cumsum([0] + windows(meta, seq_len))
        self.num_windows = int(self.offsets[-1])
        if self.num_windows == 0:
            raise DataError(f"the corpus in {source.dir} holds no window of {seq_len + 1} tokens: use more data "
                            f"or a smaller train.seq_len")
        whole = self.num_windows - self.num_windows % global_batch
        self.epoch_len = whole or self.num_windows
        self.seed, self.salt = seed, salt
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self._indexes_checked: set[int] = set()

    def window_id(self, drawn: int) -> int:
        """The window this source gives as its `drawn`-th sample of the run (from 0)."""
        epoch, within = divmod(drawn, self.epoch_len)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.salt * 7_919)
            self._order = torch.randperm(self.num_windows, generator=g).numpy()
            self._epoch = epoch
        return int(self._order[within])

    def _locate(self, window_id: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, window_id, side="right") - 1)
        return shard, (window_id - int(self.offsets[shard])) * self.seq_len

    def tokens(self, window_id: int) -> np.ndarray:
        """The window's ids, bounded by the vocabulary: token shards carry no checksum a read could use, so
        a damaged one is caught here (an id past the embedding is an IndexError on CPU, a device assert on a
        GPU), and in full by `moeyard prepare --verify`."""
        shard, start = self._locate(window_id)
        window = self.shards[shard][start:start + self.window]
        if int(window.max()) >= self.vocab_size:
            raise DataError(f"{self.dir / self.meta['shards'][shard]['file']} holds token id {int(window.max())}, "
                            f"outside the corpus's vocabulary of {self.vocab_size}: the shard is damaged; "
                            f"`moeyard prepare --verify {self.dir}` checks all of it, prepare it again to repair")
        return window

    def segments(self, window_id: int) -> np.ndarray:
        """Document of each of the window's tokens, numbered from 0 within the window."""
        shard, start = self._locate(window_id)
        if shard not in self._indexes_checked:  # a scrambled index would give wrong masks, silently
            problem = index_problem(self.starts[shard], self.meta["shards"][shard]["tokens"])
            if problem:
                raise DataError(f"{self.dir / self.meta['shards'][shard]['index']}: {problem}: the corpus is "
                                f"damaged; prepare it again")
            self._indexes_checked.add(shard)
        doc = np.searchsorted(self.starts[shard], np.arange(start, start + self.window), side="right") - 1
        return doc - doc[0]


class TokenBatches:
    """Deterministic global batches of windows from one or more corpora; each rank reads only its slice."""

    def __init__(self, sources: list[CorpusSource] | Path, seq_len: int, global_batch: int, dp_rank: int,
                 dp_size: int, seed: int, document_mask: bool = False) -> None:
        if isinstance(sources, Path):
            sources = [CorpusSource("data", sources)]
        check_corpus_size(sources[0].dir, _blend_meta(sources), seq_len, global_batch)
        # The shuffle of a source follows its name, not its place in the list: adding or reordering sources
        # on resume leaves each one's order as it was. The one-source form keeps salt 0.
        self.sources = [SourceWindows(s, seq_len, global_batch, seed, 0 if len(sources) == 1 else _salt(s.name))
                        for s in sources]
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.vocab_size = max(s.vocab_size for s in self.sources)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.dp_rank, self.dp_size, self.document_mask = dp_rank, dp_size, document_mask
        self.num_windows = sum(s.num_windows for s in self.sources)
        self.steps_per_epoch = self.sources[0].epoch_len // global_batch if len(sources) == 1 else None
        self._weights = {s.name: w for s, w in zip(sources, self.weights)}
        self._start = DataPosition(drawn={s.name: 0 for s in sources}, since_drawn={s.name: 0 for s in sources},
                                   weights=self._weights)
        self._start_step = 0
        self._step, self._position = 0, self._start
        self._before = (0, self._start)  # the position at the start of the last step taken

    def restore(self, position: DataPosition, step: int) -> None:
        """Continue from a checkpoint's position at `step`. Sources it does not know start from their
        beginning; if the sources or weights changed, the shares are counted from here on."""
        names = [s.name for s in self.sources]
        drawn = {n: position.drawn.get(n, 0) for n in names}
        if self.changed_blend(position):
            since_drawn, since = dict(drawn), position.samples
        else:
            since_drawn, since = {n: position.since_drawn.get(n, 0) for n in names}, position.since_samples
        self._start = DataPosition(position.samples, drawn, since, since_drawn, self._weights)
        self._start_step = step
        self._step, self._position = step, self._start

    def changed_blend(self, position: DataPosition) -> bool:
        """The sources or their weights differ from those that drew `position`."""
        return set(position.drawn) != set(self._weights) or any(
            abs(position.weights.get(n, -1.0) - w) > 1e-12 for n, w in self._weights.items())

    def _next_source(self, pos: DataPosition) -> int:
        k = pos.samples - pos.since_samples + 1
        deficits = [w * k - (pos.drawn[s.name] - pos.since_drawn[s.name]) for w, s in zip(self.weights, self.sources)]
        return int(np.argmax(deficits))

    def _draw(self, pos: DataPosition) -> tuple[list[tuple[int, int]], DataPosition]:
        """One global batch from `pos`: [(source, window)] and the position after it."""
        drawn, picks = dict(pos.drawn), []
        after = DataPosition(pos.samples, drawn, pos.since_samples, pos.since_drawn, pos.weights)
        for _ in range(self.global_batch):
            i = 0 if len(self.sources) == 1 else self._next_source(after)
            source = self.sources[i]
            picks.append((i, source.window_id(drawn[source.name])))
            drawn[source.name] += 1
            after.samples += 1
        return picks, after

    def _seek(self, step: int) -> None:
        """Position at the start of `step`, replaying the draws from the last restored (or first) step."""
        if step < self._step:
            if step < self._start_step:
                raise DataError(f"batch of step {step} asked for, before the restored step {self._start_step}")
            self._step, self._position = self._start_step, self._start
        while self._step < step:
            _, self._position = self._draw(self._position)
            self._step += 1

    def position_at(self, step: int) -> DataPosition:
        """The position at the start of `step`: what a checkpoint of step `step` records."""
        if step == self._before[0]:
            return self._before[1]
        self._seek(step)
        return self._position

    def global_picks(self, step: int) -> list[tuple[int, int]]:
        """[(source index, window id)] of the whole global batch `step`."""
        self._seek(step)
        picks, _ = self._draw(self._position)
        return picks

    def window_ids(self, step: int) -> list[int]:
        """This rank's windows of global batch `step` (of the first source; for a single corpus)."""
        per_rank = self.global_batch // self.dp_size
        picks = self.global_picks(step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [w for _, w in picks]

    def batch(self, step: int) -> TokenBatch:
        """This rank's share of global batch `step`; afterwards `position` is that of step + 1."""
        self._seek(step)
        picks, after = self._draw(self._position)
        per_rank = self.global_batch // self.dp_size
        mine = picks[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        tokens = torch.from_numpy(np.stack([self.sources[i].tokens(w) for i, w in mine]).astype(np.int64))
        segments = None
        if self.document_mask:
            segments = torch.from_numpy(np.stack([self.sources[i].segments(w) for i, w in mine]).astype(np.int64))
        self._before = (step, self._position)
        self._step, self._position = step + 1, after
        return TokenBatch(tokens, segments)

    def tokens_per_source(self) -> dict[str, int]:
        """Target tokens drawn from each source so far in the run (all ranks together)."""
        return {name: n * self.seq_len for name, n in self._position.drawn.items()}


def _salt(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _blend_meta(sources: list[CorpusSource]) -> dict:
    """One meta-like view of all sources' shards, for the size check."""
    metas = [read_meta(s.dir) for s in sources]
    return {"shards": [shard for m in metas for shard in m["shards"]]}
