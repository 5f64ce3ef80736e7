"""Hugging Face interop in one process: export to Qwen2-MoE, refused configs and routers, upcycling."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.hf_cases import hf_logits, moeyard_logits, save_random_model

pytest.importorskip("transformers")
from moeyard.errors import ConfigError
from moeyard.launch.cli import main  # noqa: E402
from moeyard.models import Transformer  # noqa: E402
from moeyard.trainer.config.resolve import init_model_config  # noqa: E402

TOKENS = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))


def test_native_model_exports_to_qwen2_moe(tmp_path: Path) -> None:
    """moeyard's own layout (a dense first layer, no shared expert, no biases) has an exact HF twin."""
    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.trainer.checkpoint.weights import write_weights_checkpoint

    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16, first_dense_layers=1))
    torch.manual_seed(0)
    model = Transformer(cfg)
    ckpt = write_weights_checkpoint({n: p.detach() for n, p in model.named_parameters()}, cfg,
                                    tmp_path / "ckpt", {"format": "test"})
    assert main(["convert", "to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2_moe"
    expected = moeyard_logits(ckpt, TOKENS)
    assert (hf_logits(tmp_path / "hf", TOKENS) - expected).abs().max() < 1e-4
    # ...and comes back: the zero-width shared expert it was given is passed over on import.
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    assert init_model_config(tmp_path / "again")["moe"]["num_shared_experts"] == 0
    assert (moeyard_logits(tmp_path / "again", TOKENS) - expected).abs().max() < 1e-4


def test_unsupported_hf_configs_are_refused_by_key(tmp_path: Path, capsys) -> None:
    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    for key, value, named in [("rope_parameters", {"rope_type": "linear", "factor": 4.0}, "rope scaling"),
                              ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "original_max_position"),
                              ("hidden_act", "gelu", "hidden_act"), ("model_type", "gpt2", "model_type")]:
        (hf_dir / "config.json").write_text(json.dumps({**config, key: value}))
        assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / key)]) == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / key).exists()
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "fewer")]) == 2
    assert "no place" in capsys.readouterr().err  # the third layer's tensors are left over


def test_export_refuses_routers_hf_does_not_have() -> None:
    """sigmoid_bias exports as GLM-4.5 (grouped-query attention) or DeepSeek-V3 (MLA); the others have no family."""
    from moeyard.models import ModelConfig, MoEConfig
    from moeyard.tools.hf_config import export_family

    for router in ("expert_choice", "dense_to_sparse"):
        with pytest.raises(ConfigError, match=router):
            export_family(ModelConfig(moe=MoEConfig(router=router)))
    assert export_family(ModelConfig(moe=MoEConfig(router="sigmoid_bias"))) == "glm4_moe"
    with pytest.raises(ConfigError, match="model.moe.every=2"):
        export_family(ModelConfig(moe=MoEConfig(router="sigmoid_bias", every=2)))


@pytest.mark.parametrize("family,experts,top_k,granularity",
                         [("llama", 4, 2, 1), ("qwen2", 8, 4, 2), ("qwen3", 6, 3, 3)])
def test_upcycled_model_starts_equal_to_the_dense_one(family: str, experts: int, top_k: int, granularity: int,
                                                      tmp_path: Path) -> None:
    hf_dir = save_random_model(family, tmp_path / "dense")
    ckpt = tmp_path / "moe"
    assert main(["convert", "upcycle", str(hf_dir), "--out", str(ckpt), "--experts", str(experts),
                 "--top-k", str(top_k), "--granularity", str(granularity)]) == 0
    moe = init_model_config(ckpt)["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["ffn_dim"]) == (experts, top_k, 48 // granularity)
    assert (moeyard_logits(ckpt, TOKENS) - hf_logits(hf_dir, TOKENS)).abs().max() < 1e-5


def test_upcycle_refuses_a_top_k_that_splits_the_slices(tmp_path: Path, capsys) -> None:
    hf_dir = save_random_model("llama", tmp_path / "dense")
    assert main(["convert", "upcycle", str(hf_dir), "--out", str(tmp_path / "moe"), "--experts", "8",
                 "--top-k", "3", "--granularity", "2"]) == 2
    assert "--top-k=3 must be a multiple of --granularity=2" in capsys.readouterr().err
    assert main(["convert", "upcycle", str(hf_dir), "--out", str(tmp_path / "moe"), "--experts", "4",
                 "--top-k", "1"]) == 2
    assert "needs top-k >= 2" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_export_in_shards_with_an_index_and_in_bfloat16(tmp_path: Path) -> None:
    """Files of at most max_shard_bytes (transformers loads them through the index), the tensors bit-equal
    to the checkpoint's; --dtype bfloat16 writes bf16 and says so in config.json."""
    from safetensors import safe_open

    from moeyard.tools.hf_convert import export_hf, import_hf
    from moeyard.tools.hf_files import INDEX

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    import_hf(hf_dir, ckpt)
    expected = hf_logits(hf_dir, TOKENS)
    export_hf(ckpt, tmp_path / "sharded", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    assert all((tmp_path / "sharded" / f).stat().st_size <= 40_000 + 4096 for f in files)  # + its header
    assert not list((tmp_path / "sharded").glob(".*.tmp"))
    assert (hf_logits(tmp_path / "sharded", TOKENS) - expected).abs().max() < 1e-4
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "sharded" / file), "pt") as got, \
                safe_open(str(hf_dir / "model.safetensors"), "pt") as original:
            assert torch.equal(got.get_tensor(name), original.get_tensor(name).float()), name
    export_hf(ckpt, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (hf_logits(tmp_path / "bf16", TOKENS) - expected).abs().max() < 0.1


def test_import_checks_every_tensor_before_writing_anything(tmp_path: Path, capsys) -> None:
    """A tensor missing from the HF files is found by the dry run over the headers: no folder is left."""
    from safetensors.torch import load_file, save_file

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 2
    assert "experts.3.w2.weight" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_a_truncated_safetensors_file_is_named_in_one_line(tmp_path: Path, capsys, keep: float) -> None:
    """Cut in the data (a tensor cannot be read) or in the header (the file cannot be opened)."""
    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    weights = hf_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(8, int(len(data) * keep))])
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and ("truncated" in err) and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("family,overrides", [
    ("deepseek_v3", {"q_lora_rank": None}),  # MLA with one full query projection (V2-Lite style)
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16}}),  # YaRN on GQA
])
def test_mla_without_q_lora_and_yarn_on_gqa_match_transformers(family: str, overrides: dict, tmp_path: Path) -> None:
    hf_dir = save_random_model(family, tmp_path / "hf", **overrides)
    assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    assert (moeyard_logits(tmp_path / "ckpt", TOKENS) - hf_logits(hf_dir, TOKENS)).abs().max() < 1e-4
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert (hf_logits(tmp_path / "back", TOKENS) - hf_logits(hf_dir, TOKENS)).abs().max() < 1e-4


def test_deepseek_settings_moeyard_does_not_compute_are_refused_by_key(tmp_path: Path, capsys) -> None:
    hf_dir = save_random_model("deepseek_v3", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    for key, value in [("rope_interleave", False), ("scoring_func", "softmax"), ("attention_bias", True)]:
        (hf_dir / "config.json").write_text(json.dumps({**config, key: value}))
        assert main(["convert", "from-hf", str(hf_dir), "--out", str(tmp_path / key)]) == 2
        assert key in capsys.readouterr().err
        assert not (tmp_path / key).exists()


def test_kimi_k2_config_reads_as_deepseek_v3_and_exports_as_it(tmp_path: Path) -> None:
    """Kimi-K2's config.json says model_type kimi_k2 (custom code) with DeepSeek-V3's architecture, an older
    rope_scaling dict and beta_fast = beta_slow = 1: it imports, matches transformers' DeepseekV3 on the same
    tensors, and exports as deepseek_v3."""
    yarn = {"rope_type": "yarn", "rope_theta": 50.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf_dir = save_random_model("deepseek_v3", tmp_path / "hf", rope_parameters=yarn, n_group=1, topk_group=1)
    kimi = tmp_path / "kimi"
    shutil.copytree(hf_dir, kimi)
    config = json.loads((kimi / "config.json").read_text())
    config.pop("rope_parameters")
    config |= {"model_type": "kimi_k2", "rope_theta": 50.0, "auto_map": {"AutoConfig": "configuration_kimi.KimiK2Config"},
               "rope_scaling": {"type": "yarn", **{k: v for k, v in yarn.items() if k not in ("rope_type", "rope_theta")}}}
    (kimi / "config.json").write_text(json.dumps(config))
    assert main(["convert", "from-hf", str(kimi), "--out", str(tmp_path / "ckpt")]) == 0
    expected = hf_logits(hf_dir, TOKENS)
    assert (moeyard_logits(tmp_path / "ckpt", TOKENS) - expected).abs().max() < 1e-4
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert (hf_logits(tmp_path / "back", TOKENS) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("escape", ["../elsewhere/model.safetensors", "ABSOLUTE", "fifo.safetensors"])
def test_a_from_hf_index_never_leaves_its_folder(tmp_path: Path, escape: str) -> None:
    """Issue 35 item 9: weight_map values like /abs/x.safetensors or ../x/model.safetensors were followed (any
    safetensors on the machine pulled into the checkpoint; a FIFO blocked for ever). Refused by name, nothing
    written."""
    import os

    from moeyard.tools.hf_convert import import_hf
    from moeyard.tools.hf_files import INDEX

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(hf_dir / "model.safetensors", elsewhere / "model.safetensors")
    if escape == "ABSOLUTE":
        escape = str(elsewhere / "model.safetensors")
    if escape == "fifo.safetensors":
        os.mkfifo(hf_dir / escape)
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (hf_dir / INDEX).write_text(json.dumps({"weight_map": {k: escape for k in keys}}))
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="must be a \\*.safetensors file right inside"):
        import_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_to_hf_ships_the_imported_tokenizer_or_none(tmp_path: Path, capsys) -> None:
    """Issue 35 item 6: to-hf shipped whatever tokenizer sat in the HF folder at export time; the hash the
    import recorded was never checked. The same tokenizer travels; a replaced one is left out, with a warning."""
    from helpers.tokenizer_cases import train_bpe

    from moeyard.tools.hf_convert import export_hf, import_hf

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    train_bpe(hf_dir, ["the imported model's own tokenizer"] * 5)
    import_hf(hf_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "same")
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    train_bpe(hf_dir, ["a different tokenizer trained later on other text"] * 5, vocab_size=300)
    export_hf(tmp_path / "ckpt", tmp_path / "replaced")
    assert not (tmp_path / "replaced" / "tokenizer.json").exists()
    assert "is no longer at" in capsys.readouterr().out


def test_integer_weights_are_refused_not_converted_as_numbers(tmp_path: Path) -> None:
    """Issue 35 rough edge: I32 safetensors were silently .float()-ed."""
    from safetensors.torch import load_file, save_file

    from moeyard.tools.hf_convert import import_hf

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(ConfigError, match="stored as I32, not floating point"):
        import_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_config_json_is_held_to_the_safetensors_before_anything_is_sized_from_it(tmp_path: Path) -> None:
    """Issue 35 item 10: `hidden_size: 4e10`-like values allocated tens of GB (rope_order) before any shape
    check. The embedding's header shape is compared first."""
    from moeyard.tools.hf_convert import import_hf

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config["hidden_size"] = 10**9 * config["num_attention_heads"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json belongs to another model, or was edited"):
        import_hf(hf_dir, tmp_path / "ckpt")


def test_non_finite_weights_convert_with_a_note(tmp_path: Path, capsys) -> None:
    """Issue 35 rough edge: NaN/inf weights converted without a word."""
    from safetensors.torch import load_file, save_file

    from moeyard.tools.hf_convert import import_hf

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(hf_dir / "model.safetensors"))
    import_hf(hf_dir, tmp_path / "ckpt")
    assert "1 tensors hold NaN or inf (first: norm.weight)" in capsys.readouterr().out



def test_a_model_in_the_hf_cache_layout_imports(tmp_path: Path) -> None:
    """The HF cache's snapshot files are links into its blobs: an index naming them is followed (a regular
    file once the link is), unlike a path out of the folder (test_a_from_hf_index_never_leaves_its_folder)."""
    import os

    from moeyard.tools.hf_convert import import_hf
    from moeyard.tools.hf_files import INDEX

    hf_dir = save_random_model("mixtral", tmp_path / "hf")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(hf_dir / "model.safetensors", blobs / "abc123")
    os.symlink(os.path.relpath(blobs / "abc123", hf_dir), hf_dir / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(blobs / "abc123"), "pt") as f:
        keys = list(f.keys())
    (hf_dir / INDEX).write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    import_hf(hf_dir, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "manifest.json").is_file()
