"""Config parsing: shipped configs round-trip, overrides are typed, bad values name the key."""
from __future__ import annotations

import pytest

from moeyard import configs
from moeyard.errors import ConfigError
from moeyard.trainer.config.sections import dump_yaml, read_config, validate_for_world


def test_shipped_tiny_config_loads_and_round_trips(tmp_path) -> None:
    cfg = read_config(configs.path("tiny.yaml"))
    assert cfg.parallel.ep == 2 and cfg.model.moe.num_experts == 8
    copy = tmp_path / "resolved.yaml"
    copy.write_text(dump_yaml(cfg))
    assert read_config(copy) == cfg


def test_overrides_are_typed() -> None:
    cfg = read_config(configs.path("tiny.yaml"),
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
    (["parallel.pp=2", "parallel.fsdp=true", "parallel.fsdp_gather_once=true", "parallel.fsdp_reduce_once=[true]"],
     "parallel.fsdp_reduce_once=[true] has 1 values for parallel.pp=2 pipeline ranks"),
    (["parallel.pp=2", "parallel.fsdp=true", "parallel.fsdp_reduce_once=[true,true]"],
     "parallel.fsdp_reduce_once=[true, true] chooses, rank by rank, between reducing once a step and in every "
     "micro-step, which only fsdp gathered once does"),
    (["parallel.fsdp_reduce_once=[sometimes]"], "parallel.fsdp_reduce_once[0]='sometimes' must be true or false"),
    (["train.fp8_dispatch=true"], "train.fp8_dispatch=true sends the experts FP8 rows for their FP8 GEMMs: set "
                                  "train.fp8=rowwise (it is none)"),
    (["train.fp8=rowwise", "train.fp8_dispatch=true", "schedule.dispatch=auto"],
     "train.fp8_dispatch=true is built for the flat exchange, not schedule.dispatch=auto"),
])
def test_bad_values_name_the_key(override, fragment) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        read_config(configs.path("tiny.yaml"), override)
    assert fragment in str(err.value)


def test_fsdp_reduce_once_takes_one_value_or_one_per_pipeline_rank() -> None:
    """A list gives each pipeline rank its own (the planner's per-rank choice); one value gives it to all."""
    base = ["parallel.pp=2", "parallel.fsdp=true", "parallel.fsdp_gather_once=true"]
    per_rank = read_config(configs.path("tiny.yaml"), [*base, "parallel.fsdp_reduce_once=[true,false]"]).parallel
    assert per_rank.fsdp_reduce_once == [True, False] and per_rank.reduce_once == (True, False)
    every = read_config(configs.path("tiny.yaml"), [*base, "parallel.fsdp_reduce_once=false"]).parallel
    assert every.reduce_once is False


def test_router_settings_live_in_their_section_and_the_old_flat_keys_still_read(tmp_path) -> None:
    """model.moe.sigmoid_bias.n_groups today; model.moe.n_groups in older configs and checkpoint manifests:
    both give the same config, which is written in today's form; one setting given both ways with two values
    is refused."""
    new = read_config(configs.path("tiny.yaml"), [
        "model.moe.router=sigmoid_bias", "model.moe.sigmoid_bias.n_groups=4", "model.moe.sigmoid_bias.topk_groups=2",
        "model.moe.sigmoid_bias.bias_update_rate=0.01", "model.moe.dense_to_sparse.steps=7",
        "model.moe.dense_to_sparse.start_temperature=3.0", "model.moe.dense_to_sparse.end_temperature=0.5"])
    old = read_config(configs.path("tiny.yaml"), [
        "model.moe.router=sigmoid_bias", "model.moe.n_groups=4", "model.moe.topk_groups=2",
        "model.moe.bias_update_rate=0.01", "model.moe.dts_steps=7", "model.moe.dts_start_temperature=3.0",
        "model.moe.dts_end_temperature=0.5"])
    assert old == new and new.model.moe.sigmoid_bias.n_groups == 4 and new.model.moe.dense_to_sparse.steps == 7
    assert read_config(configs.path("tiny.yaml"), ["model.moe.router=switch", "model.moe.top_k=1",
                                                   "model.moe.jitter=0.01"]).model.moe.switch.jitter == 0.01
    written = dump_yaml(old)
    assert "sigmoid_bias:" in written and "n_groups: 4" in written and "dts_steps" not in written
    # An override by the old name overrides a file in today's form; a file giving both, two ways, is refused.
    shipped = read_config(configs.path("tiny-dense-to-sparse.yaml"), ["model.moe.dts_steps=2"])
    assert shipped.model.moe.dense_to_sparse.steps == 2
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  moe:\n    router: sigmoid_bias\n    n_groups: 2\n    sigmoid_bias:\n      n_groups: 4\n")
    with pytest.raises(ConfigError, match="model.moe.n_groups=2 and model.moe.sigmoid_bias.n_groups=4 set the same"):
        read_config(both)


def test_a_checkpoint_with_flat_router_keys_merges_with_todays_sections(tmp_path) -> None:
    """checkpoint.init's model section as an older version recorded it, under a config in today's form: the
    user's router settings win, the checkpoint's others stay."""
    from moeyard.trainer.config.resolve import merge_model_config

    recorded = {"moe": {"router": "sigmoid_bias", "num_experts": 8, "n_groups": 4, "topk_groups": 2,
                        "bias_update_rate": 0.01}}
    merged = merge_model_config(recorded, {"moe": {"sigmoid_bias": {"topk_groups": 1}}}, tmp_path)
    assert merged["moe"]["sigmoid_bias"] == {"n_groups": 4, "topk_groups": 1, "bias_update_rate": 0.01}
    assert "n_groups" not in merged["moe"]


def test_world_size_must_fit_ep_and_batch() -> None:
    cfg = read_config(configs.path("tiny.yaml"))
    validate_for_world(cfg, 4)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of parallel.ep=2"):
        validate_for_world(cfg, 3)
    cfg = read_config(configs.path("tiny.yaml"), ["train.global_batch_tokens=768", "train.seq_len=256"])
    with pytest.raises(ConfigError, match="3 sequences .* do not split evenly over 2 processes"):
        validate_for_world(cfg, 2)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config(bad)


def test_a_folder_given_as_config_and_a_corpus_listed_twice_are_named(tmp_path) -> None:
    """Issue 35 rough edges: a directory given as the config said "does not exist"; the same corpus under two
    names was accepted (read at twice its weight)."""
    with pytest.raises(ConfigError, match="is a folder: give the YAML file"):
        read_config(tmp_path)
    (tmp_path / "corpus").mkdir()
    twice = ["data.source=null", f"data.sources=[{{dir: {tmp_path / 'corpus'}, name: a}}, "
                                 f"{{dir: {tmp_path / 'corpus'}/, name: b}}]"]
    with pytest.raises(ConfigError, match="lists the corpus .* more than once"):
        read_config(configs.path("tiny.yaml"), twice)
