"""Bad input, fuzzed (hypothesis): any value for any config key, any line in an SFT file, any meta.json of
a prepared corpus is either accepted or refused as one `error:` line with exit code 2 that names the key
or the `file:line` -- never a traceback."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeyard import configs
from moeyard.errors import BAD_INPUT, run_reporting
from moeyard.trainer.config.sections import Config, config_from_tree
from moeyard.trainer.config.yaml_tree import read_tree
from moeyard.trainer.data.sft import read_conversations
from moeyard.trainer.data.tokens import prepare_folder, read_meta


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            keys += _leaf_keys(inner[0], f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


KEYS = _leaf_keys(Config)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["off", "on", "auto", "-1", "1e400", "inf", "nan", ""]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tree(key: str, value: object) -> dict:
    """The shipped demo config with one value replaced."""
    tree = read_tree(configs.path("tiny.yaml"))
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return tree
    node[leaf] = value
    return tree


def _reported(capsys, action) -> tuple[int, str]:
    code = run_reporting(action)
    err = capsys.readouterr().err
    return code, err


@FAST
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_for_any_key_is_accepted_or_refused_naming_the_key(capsys, key, value) -> None:
    code, err = _reported(capsys, lambda: (config_from_tree(_tree(key, value)), 0)[1])
    if code == 0:
        return
    assert code == BAD_INPUT and err.startswith("error: ") and err.count("\n") == 1, err
    leaf = key.split(".")[-1]
    assert leaf in err, f"{key}={value!r}: the message does not name the key: {err}"


@FAST
@given(key=st.sampled_from(KEYS), raw=st.text(max_size=30))
def test_any_override_text_is_accepted_or_refused_naming_the_key(capsys, key, raw) -> None:
    tiny = configs.path("tiny.yaml")
    code, err = _reported(capsys, lambda: (config_from_tree(read_tree(tiny, [f"{key}={raw}"])), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1 and key.split(".")[-1] in err, f"{key}={raw!r}: {err}"


@FAST
@given(path=st.lists(st.text(st.characters(blacklist_characters=".="), min_size=1, max_size=8), min_size=1,
                     max_size=3), value=SCALARS)
def test_unknown_keys_are_refused_by_name(capsys, path, value) -> None:
    key = ".".join(path)
    code, err = _reported(capsys, lambda: (config_from_tree(_tree(key, value)), 0)[1])
    if key not in KEYS and not any(k.startswith(key + ".") for k in KEYS):
        assert code == BAD_INPUT and err.count("\n") == 1, f"{key}={value!r}: {err}"


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["messages", "role", "content", "prompt", "completion", "file", "tokens",
                                         "x"]), inner,
                        max_size=3), max_leaves=8)
LINE = st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40),
                 st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))


@FAST
@given(lines=st.lists(LINE, min_size=1, max_size=5), skip=st.booleans())
def test_any_sft_line_is_read_or_refused_with_file_and_line(tmp_path_factory, capsys, lines, skip) -> None:
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    code, err = _reported(capsys, lambda: (read_conversations(path, skip), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1, err
        assert f"{path}:" in err or "holds no usable conversation" in err, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    (src / "a.py").write_bytes(b"print('hello')\n" * 400 + b"\xff\xfe not utf-8 \x80\n")
    out = tmp_path_factory.mktemp("corpus") / "tokens"
    prepare_folder(src, out, "*.py")
    return out


SHARD = st.fixed_dictionaries({"file": st.one_of(JSON, st.sampled_from(["../x", "/etc/hostname", "", ".", "a\0b",
                                                                        "tokens_00000.bin"])),
                                "tokens": st.one_of(JSON, st.integers(-2, 10**6)),
                                "index": st.one_of(JSON, st.sampled_from(["../x", "docs_00000.bin"])),
                                "documents": st.one_of(JSON, st.integers(-2, 10**6))})
META = st.one_of(JSON, st.fixed_dictionaries({"format": st.one_of(st.just(None), JSON),
                                              "shards": st.one_of(JSON, st.lists(SHARD, max_size=3)),
                                              "vocab_size": JSON}))


@FAST
@given(meta=META, raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_any_meta_json_is_read_or_refused_naming_the_file(corpus, capsys, meta, raw) -> None:
    original = (corpus / "meta.json").read_bytes()
    good = json.loads(original)
    if isinstance(meta, dict) and meta.get("format") is None:
        meta = {**good, **{k: v for k, v in meta.items() if k != "format"}}
    try:
        (corpus / "meta.json").write_bytes(raw if raw is not None else json.dumps(meta).encode())
        code, err = _reported(capsys, lambda: (read_meta(corpus), 0)[1])
    finally:
        (corpus / "meta.json").write_bytes(original)
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1 and str(corpus) in err, err


@pytest.mark.parametrize("name", ["../tokens_00000.bin", "/etc/hostname", "sub/tokens_00000.bin"])
def test_a_shard_name_that_leaves_the_corpus_is_refused(corpus, name) -> None:
    from moeyard.errors import DataError

    original = (corpus / "meta.json").read_bytes()
    meta = json.loads(original)
    meta["shards"][0]["file"] = name
    try:
        (corpus / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="shards must be a non-empty list"):
            read_meta(corpus)
    finally:
        (corpus / "meta.json").write_bytes(original)


TOKENIZER_JSON = st.one_of(JSON, st.fixed_dictionaries({
    "model": st.one_of(JSON, st.fixed_dictionaries({"type": st.sampled_from(["BPE", "WordLevel", "Unigram"]),
                                                    "vocab": st.one_of(JSON, st.dictionaries(st.text(max_size=3),
                                                                                             JSON, max_size=3))})),
    "added_tokens": st.one_of(JSON, st.lists(st.dictionaries(st.sampled_from(["id", "content", "special"]), JSON,
                                                             max_size=3), max_size=3))}))


@FAST
@given(data=TOKENIZER_JSON, config=st.one_of(st.none(), JSON), raw=st.one_of(st.none(), st.binary(max_size=20)))
def test_any_tokenizer_folder_is_read_or_refused_naming_the_file(tmp_path_factory, capsys, data, config, raw) -> None:
    """tokenizer.json (model null or a list, a token without an id, a string vocabulary, non-integer ids) and
    tokenizer_config.json of any shape: a record, or one error line naming the folder."""
    from moeyard.trainer.data.tokenizer import tokenizer_record

    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_bytes(raw if raw is not None else json.dumps(data).encode())
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = _reported(capsys, lambda: (tokenizer_record(folder), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1 and str(folder) in err, err


@FAST
@given(index=st.one_of(JSON, st.fixed_dictionaries({"weight_map": st.one_of(JSON, st.dictionaries(
    st.text(max_size=5), st.one_of(JSON, st.sampled_from(["../x.safetensors", "/etc/passwd", "model.safetensors",
                                                          "a/b.safetensors", ""])), max_size=3))})))
def test_any_safetensors_index_is_read_or_refused_naming_it(tmp_path_factory, capsys, index) -> None:
    from moeyard.tools.hf_weights import HFTensors

    folder = tmp_path_factory.mktemp("hf")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = _reported(capsys, lambda: (HFTensors(folder, dry=True), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1 and "model.safetensors.index.json" in err, err


@FAST
@given(state=st.one_of(JSON, st.fixed_dictionaries({"_data_files": st.one_of(JSON, st.lists(st.dictionaries(
    st.sampled_from(["filename", "x"]), st.one_of(JSON, st.sampled_from(["../x.arrow", "/etc/passwd",
                                                                          "data.arrow"])), max_size=2), max_size=2))})))
def test_any_datasets_state_json_is_read_or_refused_naming_it(tmp_path_factory, capsys, state) -> None:
    from moeyard.trainer.data.sources import open_source

    folder = tmp_path_factory.mktemp("ds")
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    code, err = _reported(capsys, lambda: (open_source(folder, "*"), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1 and str(folder) in err, err


HF_KEYS = ["model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts", "num_experts_per_tok",
           "moe_intermediate_size", "rope_theta", "max_position_embeddings", "head_dim", "rms_norm_eps"]
MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64}


@FAST
@given(key=st.sampled_from(HF_KEYS), value=st.one_of(JSON, st.sampled_from([None, 0, -1, 4e10, 10**12, "x", []])))
def test_any_hf_config_value_is_read_or_refused_naming_the_key(capsys, key, value) -> None:
    """HF config.json (intermediate_size: null, a hidden size of 4e10, ...): a config, or one error line."""
    from moeyard.tools.hf_config import moe_model_config

    code, err = _reported(capsys, lambda: (moe_model_config({**MIXTRAL, key: value}), 0)[1])
    if code != 0:
        assert code == BAD_INPUT and err.count("\n") == 1, f"{key}={value!r}: {err}"
