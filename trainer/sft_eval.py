"""Exact-match accuracy of a model on the held-out conversations of an SFT config (greedy decoding).

Runs in one process without a process group. Prompts of different lengths go in one batch, left-padded
with segment id 0: positions restart in each prompt's segment and padding is never attended to, so each
prompt computes what it would alone. No KV cache: each new token re-runs the batch (fine for the demo's
short answers).
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeyard.models import Transformer

from .checkpoint import load_full_model
from .checkpoint_store import read_manifest
from .config import Config, build_config
from .sft_batches import chat_template, conversations_of
from .sft_data import split_heldout


@torch.no_grad()
def greedy_answers(model: Transformer, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int,
                   pad_id: int) -> list[list[int]]:
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
        next_ids = model(tokens, segment).logits_BTV[:, -1].argmax(dim=-1).tolist()
        still = []
        for i, token in zip(running, next_ids):
            if token not in stop_ids:
                answers[i].append(token)
                still.append(i)
        running = still
    return answers


def exact_match(cfg: Config, checkpoint: Path, limit: int | None = None, max_new_tokens: int = 64,
                batch_size: int = 64) -> tuple[float, int, list[tuple[str, str]]]:
    """(accuracy, examples, [(expected, got)] of the first few) on the config's held-out split."""
    _, held = split_heldout(conversations_of(cfg)[0], cfg.sft.heldout_fraction, cfg.run.seed)
    held = [c for c in held if c[-1]["role"] == "assistant"][:limit]
    template = chat_template(cfg)
    model_cfg = build_config(read_manifest(checkpoint)["config"]).model
    model = Transformer(model_cfg).eval()  # the evaluated checkpoint's own model, whatever the config says
    load_full_model(checkpoint, model)
    prompts = [template.prompt(c[:-1]) for c in held]
    got: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers = greedy_answers(model, prompts[start:start + batch_size], template.stop_ids(), max_new_tokens,
                                 template.pad_id)
        got += [template.decode(a) for a in answers]
    expected = [c[-1]["content"] for c in held]
    hits = sum(e.strip() == g.strip() for e, g in zip(expected, got))
    return hits / max(1, len(held)), len(held), list(zip(expected, got))[:5]
