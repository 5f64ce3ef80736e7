"""DeepSeek-V3's multi-token-prediction module through `convert from-hf` / `to-hf`: imported as model.mtp_layers,
computing what transformers' own modules compute from it, written back bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.hf_cases import hf_logits, mtp_reference_logits, save_deepseek_with_mtp

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from moeyard.launch.cli import main  # noqa: E402
from moeyard.models import Transformer  # noqa: E402
from moeyard.trainer.checkpoint.sharded import load_full_model  # noqa: E402
from moeyard.trainer.config.resolve import init_model_config  # noqa: E402
from moeyard.trainer.config.sections import build_config  # noqa: E402

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def _imported(ckpt: Path) -> Transformer:
    model = Transformer(build_config({"model": init_model_config(ckpt)}).model)
    load_full_model(ckpt, model)
    return model.eval()


def test_mtp_module_imports_matches_transformers_and_round_trips(tmp_path: Path) -> None:
    hf_dir = save_deepseek_with_mtp(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(ckpt)]) == 0
    model = _imported(ckpt)
    assert model.cfg.mtp_layers == 1
    with torch.no_grad():
        out = model(TOKENS, mtp=True)
        mtp_logits = model.output(out.mtp_hidden[0])
    assert (out.logits_BTV - hf_logits(hf_dir, TOKENS)).abs().max() < 1e-4
    assert (mtp_logits - mtp_reference_logits(hf_dir, TOKENS)).abs().max() < 1e-4

    back = tmp_path / "back"
    assert main(["convert", "to-hf", str(ckpt), "--out", str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["num_nextn_predict_layers"] == 1
    original, written = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(written) == sorted(original)
    for name, t in original.items():
        assert torch.equal(written[name], t), name


def test_mtp_copies_that_differ_are_refused_and_a_copy_without_mtp_imports_the_main_model(tmp_path: Path,
                                                                                         capsys) -> None:
    hf_dir = save_deepseek_with_mtp(tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.3.shared_head.head.weight"] += 0.01
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "bad")]) == 2
    assert "model.layers.3.shared_head.head.weight differs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "main")]) == 0
    assert "importing without MTP" in capsys.readouterr().out
    assert _imported(tmp_path / "main").cfg.mtp_layers == 0
