"""Peak memory readings: they see an allocation, and reset for the next interval."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moeyard.models import ModelConfig, Transformer
from moeyard.trainer.memory_stats import _CLEAR_REFS, model_state_line, peak_bytes

CPU = torch.device("cpu")


def test_cpu_peak_sees_an_allocation_and_resets_after_reading() -> None:
    if not _CLEAR_REFS.exists():
        pytest.skip("the peak resident set can be reset only on Linux")
    peak_bytes(CPU)  # start an interval
    base = peak_bytes(CPU)
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    with_block = peak_bytes(CPU)
    del block
    peak_bytes(CPU)  # the interval in which the block was freed still saw it
    after = peak_bytes(CPU)
    assert with_block >= base + 190 * 2**20
    assert after < with_block - 150 * 2**20, "the peak was not reset after it was read"


def test_model_state_line_counts_this_ranks_parameters() -> None:
    model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                    max_seq_len=8))
    mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert model_state_line(model) == (f"parameters {mib:,.1f} MiB, gradients {mib:,.1f} MiB, AdamW moments up "
                                       f"to {2 * mib:,.1f} MiB")
