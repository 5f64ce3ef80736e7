"""Config parsing: shipped configs round-trip, overrides are typed, bad values name the key."""
from __future__ import annotations

import pytest

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config import dump_yaml, load_config, validate_for_world


def test_shipped_tiny_config_loads_and_round_trips(tmp_path) -> None:
    cfg = load_config(configs.path("tiny.yaml"))
    assert cfg.parallel.ep == 2 and cfg.model.moe.num_experts == 8
    copy = tmp_path / "resolved.yaml"
    copy.write_text(dump_yaml(cfg))
    assert load_config(copy) == cfg


def test_overrides_are_typed() -> None:
    cfg = load_config(configs.path("tiny.yaml"),
                      ["optim.lr=3e-4", "train.steps=7", "model.moe.capacity_factor=1.25", "log.tensorboard=false"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7
    assert cfg.model.moe.capacity_factor == 1.25 and cfg.log.tensorboard is False


@pytest.mark.parametrize("override,fragment", [
    (["model.moe.num_expert=4"], "unknown config key 'model.moe.num_expert'"),
    (["trian.steps=3"], "unknown config key 'trian'"),
    (["model.moe.top_k=9"], "model.moe.top_k=9"),
    (["parallel.ep=3"], "model.moe.num_experts=8 is not divisible by parallel.ep=3"),
    (["train.steps=ten"], "train.steps='ten' must be an integer"),
    (["train.seq_len=1024"], "train.seq_len=1024 exceeds model.max_seq_len=256"),
    (["train.global_batch_tokens=1000"], "not a multiple of train.seq_len"),
    (["parallel.backend=mpi"], "parallel.backend='mpi' is not one of"),
    (["model.dim=130"], "model.dim=130 is not divisible by model.n_heads=4"),
    (["optim.lr"], "must look like key.path=value"),
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be >= 0"),
    (["optim.beta2=1.5"], "optim.beta2=1.5 must be in [0, 1)"),
    (["run.dir=runs/{nmae}"], "has a placeholder other than {name}"),
    (["data.source=null"], "set data.dir to a prepared corpus"),
])
def test_bad_values_name_the_key(override, fragment) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(configs.path("tiny.yaml"), override)
    assert fragment in str(err.value)


def test_world_size_must_fit_ep_and_batch() -> None:
    cfg = load_config(configs.path("tiny.yaml"))
    validate_for_world(cfg, 4)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of parallel.ep=2"):
        validate_for_world(cfg, 3)
    cfg = load_config(configs.path("tiny.yaml"), ["train.global_batch_tokens=768", "train.seq_len=256"])
    with pytest.raises(ConfigError, match="3 sequences .* do not split evenly over 2 processes"):
        validate_for_world(cfg, 2)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_folder_given_as_config_and_a_corpus_listed_twice_are_named(tmp_path) -> None:
    """Issue 35 rough edges: a directory given as the config said "does not exist"; the same corpus under two
    names was accepted (read at twice its weight)."""
    with pytest.raises(ConfigError, match="is a folder: give the YAML file"):
        load_config(tmp_path)
    (tmp_path / "corpus").mkdir()
    twice = ["data.source=null", f"data.sources=[{{dir: {tmp_path / 'corpus'}, name: a}}, "
                                 f"{{dir: {tmp_path / 'corpus'}/, name: b}}]"]
    with pytest.raises(ConfigError, match="lists the corpus .* more than once"):
        load_config(configs.path("tiny.yaml"), twice)
