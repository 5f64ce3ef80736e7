"""`moeyard convert from-hf` and `to-hf`: HF save_pretrained folders <-> moeyard checkpoints.

Both run in one process with no process group. Import reads config.json and safetensors only (no
transformers needed); export writes config.json + model.safetensors that transformers' own classes load.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeyard.models import Transformer
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.store import verify
from moeyard.trainer.checkpoint.weights import write_weights_checkpoint
from moeyard.trainer.config import build_config
from moeyard.trainer.tools.hf_config import export_family, hf_config_dict, moe_model_config, read_hf_config
from moeyard.trainer.tools.hf_weights import HFTensors, hf_to_moeyard, moeyard_to_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def import_hf(hf_dir: Path, out: Path) -> tuple[str, Path]:
    """(family, checkpoint path) of an HF MoE model converted into a weights-only moeyard checkpoint."""
    family, model_cfg = moe_model_config(read_hf_config(hf_dir))
    state = hf_to_moeyard(HFTensors(hf_dir), model_cfg, family)
    source = {"format": "huggingface", "family": family, "dir": str(hf_dir.resolve())}
    return family, write_weights_checkpoint(state, model_cfg, out, source)


def export_hf(ckpt: Path, out_dir: Path) -> tuple[str, Path]:
    """(family, folder) of a moeyard checkpoint written as an HF model of the family that computes it exactly.

    Tokenizer files of the HF folder a converted checkpoint came from are copied along when still there.
    """
    manifest = verify(ckpt)
    model_cfg = build_config(manifest["config"]).model
    family = export_family(model_cfg)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder for the export")
    with torch.device("cpu"):
        model = Transformer(model_cfg)
    load_full_model(ckpt, model)
    state = {n: p.detach() for n, p in model.named_parameters()}
    tensors = moeyard_to_hf(state, model_cfg, family)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, family), indent=1))
    source_dir = Path(manifest.get("source", {}).get("dir", "/nonexistent"))
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    return family, out_dir
