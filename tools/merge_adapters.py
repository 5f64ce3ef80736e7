"""`moeyard convert merge-adapters`: fold plain LoRA adapters into the base weights, where that is exact.

W x + s * B A x == (W + s * (A B)^T) x for every input, so a `peft.method: lora` model becomes a plain
model with the same function (up to float rounding, measured on a probe batch and recorded). Routed
adapters (lora_moe, rank1_moe) choose their mixture per token: no single matrix equals them, and the
merge refuses and says so. The output is a weights-only checkpoint with `peft.method: none`: it trains,
evaluates and exports to Hugging Face like any other.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from moeyard.errors import CheckpointError, ConfigError
from moeyard.models import build_model
from moeyard.models.config import PEFTConfig
from moeyard.models.peft.adapters import is_adapter_parameter, merge_dense_adapters
from moeyard.trainer.checkpoint.sharded import fill_model, load_full_model, persistent_buffers
from moeyard.trainer.checkpoint.store import verify
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.config.sections import build_config
from moeyard.trainer.data.compat import checkpoint_tokenizer


@torch.no_grad()
def merge_adapters(ckpt: Path, out: Path, probe_tokens: int = 256) -> dict[str, Any]:
    """Write the merged model to `out`; returns the merged adapters and the largest logit change."""
    try:
        manifest = verify(ckpt)
    except CheckpointError as err:
        raise ConfigError(f"moeyard convert merge-adapters: {err}") from None
    cfg = build_config(manifest["config"]).model
    if cfg.peft.method == "none":
        raise ConfigError(f"{ckpt} has no adapters (model.peft.method=none): nothing to merge")
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new folder for the merged checkpoint")
    model = build_model(cfg).eval()
    load_full_model(ckpt, model)
    seq_len = min(cfg.max_seq_len, probe_tokens)
    probe = torch.randint(0, cfg.vocab_size, (max(1, probe_tokens // seq_len), seq_len),
                          generator=torch.Generator().manual_seed(0))
    before = model(probe).logits_BTV
    merged = merge_dense_adapters(model)  # refuses routed adapters
    plain_cfg = dataclasses.replace(cfg, peft=PEFTConfig())
    state = {n: p.detach() for n, p in model.named_parameters() if not is_adapter_parameter(n)}
    buffers = persistent_buffers(model)  # router state of the base; adapters have none
    plain = build_model(plain_cfg).eval()
    fill_model(plain, state, buffers)
    difference = float((plain(probe).logits_BTV - before).abs().max())
    tolerance = 1e-4 * max(1.0, float(before.abs().max()))  # float32 rounding of W + s (AB)^T is far below
    if difference > tolerance:
        raise ConfigError(f"the merged model's logits differ from the adapted model's by {difference:.2e} on a "
                          f"probe batch (tolerance {tolerance:.1e}): not writing {out}. Please report this")
    report = {"merged": merged, "max_logit_difference": difference, "probe_tokens": probe.numel()}
    source = {"family": "moeyard (merged adapters)", "dir": str(ckpt), **report}
    tokenizer = checkpoint_tokenizer(manifest)
    if tokenizer is not None:  # the merged model needs the tokenizer its adapters were trained with
        source["tokenizer"] = tokenizer
    write_weights_checkpoint(state, plain_cfg, out, buffers=buffers, source=source)
    return report
