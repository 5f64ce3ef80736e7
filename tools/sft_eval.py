"""Exact-match accuracy of a model on the held-out conversations of an SFT config (greedy decoding).

Runs in one process without a process group. Prompts of different lengths go in one batch, left-padded
with segment id 0: positions restart in each prompt's segment and padding is never attended to, so each
prompt computes what it would alone. No KV cache: each new token re-runs the batch (fine for the demo's
short answers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moeyard.models import Transformer, build_model
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.store import read_manifest
from moeyard.trainer.config.sections import Config, build_config
from moeyard.trainer.data.sft import split_heldout
from moeyard.trainer.data.sft_batches import chat_template, conversations_of
from moeyard.trainer.step import skip_counts


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    examples: int
    samples: list[tuple[str, str]]
    """(expected, got) of the first few examples."""
    skip_threshold: float
    """The model.moe.skip_threshold the evaluation ran with (0: no expert skipping)."""
    skipped_fraction: float
    """Expert computations (token copies, padding included) that expert skipping left out; 0 when off."""


@torch.no_grad()
def greedy_answers(model: Transformer, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                   pad_id: int, copies: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Each prompt's greedy answer; adds [skipped, all] expert copies of every forward to `copies`."""
    limit = model.cfg.max_seq_len
    answers: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        running = [i for i in running if len(prompts[i]) + len(answers[i]) < limit]
        if not running:
            break
        seqs = [prompts[i] + answers[i] for i in running]
        width = max(map(len, seqs))
        tokens = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
        segment = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        out = model(tokens, segment)
        if copies is not None:
            copies += skip_counts(out.moe_stats)
        next_ids = out.logits_BTV[:, -1].argmax(dim=-1).tolist()
        still = []
        for i, token in zip(running, next_ids):
            if token not in stop_ids:
                answers[i].append(token)
                still.append(i)
        running = still
    return answers


def exact_match(cfg: Config, checkpoint: Path, limit: int | None = None, max_new_tokens: int = 64,
                batch_size: int = 64, skip_threshold: float | None = None) -> EvalResult:
    """Exact match on the config's held-out split; `skip_threshold` turns on expert skipping (it overrides
    the checkpoint's model.moe.skip_threshold)."""
    _, held = split_heldout(conversations_of(cfg)[0], cfg.sft.heldout_fraction, cfg.run.seed)
    held = [c for c in held if c[-1]["role"] == "assistant"][:limit]
    template = chat_template(cfg)
    model_cfg = build_config(read_manifest(checkpoint)["config"]).model
    if skip_threshold is not None:
        model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe,
                                                                           skip_threshold=skip_threshold))
    model = build_model(model_cfg).eval()  # the evaluated checkpoint's own model, whatever the config says
    load_full_model(checkpoint, model)
    prompts = [template.prompt(c[:-1]) for c in held]
    got: list[str] = []
    copies = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(prompts), batch_size):
        answers = greedy_answers(model, prompts[start:start + batch_size], template.stop_ids(), max_new_tokens,
                                 template.pad_id, copies)
        got += [template.decode(a) for a in answers]
    expected = [c[-1]["content"] for c in held]
    hits = sum(e.strip() == g.strip() for e, g in zip(expected, got))
    skipped, all_copies = copies.tolist()
    return EvalResult(hits / max(1, len(held)), len(held), list(zip(expected, got))[:5],
                      model_cfg.moe.skip_threshold, skipped / max(1.0, all_copies))
