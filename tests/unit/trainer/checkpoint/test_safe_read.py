"""Reading a checkpoint never runs code from it, and never reaches outside its folder."""
from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from helpers.untrusted import REAL, malicious_checkpoint, write_consistent_manifest

from moeyard.errors import CheckpointError
from moeyard.models import Transformer
from moeyard.trainer.checkpoint import safe_read
from moeyard.trainer.checkpoint.sharded import load_full_model
from moeyard.trainer.checkpoint.store import CheckpointStore, check_files, latest_of, resolve_init, verify
from moeyard.trainer.checkpoint.weights import CheckpointTensors
from moeyard.trainer.config.sections import build_config


def _model():
    return Transformer(build_config(json.loads((REAL / "manifest.json").read_text())["config"]).model)


def test_a_real_checkpoint_reads_through_the_restricted_unpickler():
    meta = safe_read.read_metadata(REAL)
    assert "model.tok_embeddings.weight" in meta.state_dict_metadata
    assert len(meta.storage_data) > 10


@pytest.mark.parametrize("reader", ["metadata", "full_model", "tensors"])
def test_a_pickle_payload_is_refused_by_every_reader_and_never_runs(tmp_path, reader):
    marker = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "step_000002", marker)
    verify(ckpt)  # the attacker's manifest is consistent: only the reader can stop it
    with pytest.raises(CheckpointError, match=r"\.metadata asks to construct posix\.system"):
        if reader == "metadata":
            safe_read.read_metadata(ckpt)
        elif reader == "full_model":
            load_full_model(ckpt, _model())
        else:
            CheckpointTensors(ckpt)
    assert not marker.exists()


def _rewrite_metadata(folder, change):
    md = safe_read.read_metadata(REAL)
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    write_consistent_manifest(folder)


def test_metadata_that_declares_a_pickled_object_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = malicious_checkpoint(tmp_path / "c", tmp_path / "unused")
    _rewrite_metadata(ckpt, lambda md: md.state_dict_metadata.__setitem__("model.tok_embeddings.weight",
                                                                           BytesStorageMetadata()))
    with pytest.raises(CheckpointError, match="'model.tok_embeddings.weight' is a pickled object"):
        load_full_model(ckpt, _model())


def test_metadata_whose_shard_file_leaves_the_folder_is_refused(tmp_path):
    ckpt = malicious_checkpoint(tmp_path / "c", tmp_path / "unused")

    def escape(md):
        index = next(iter(md.storage_data))
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], relative_path="../../etc/hostname")

    _rewrite_metadata(ckpt, escape)
    with pytest.raises(CheckpointError, match="not a file inside the checkpoint folder"):
        safe_read.read_metadata(ckpt)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "..", "sub/file"])
def test_manifest_names_outside_the_folder_are_refused_before_opening(tmp_path, name):
    (tmp_path / "outside.txt").write_text("secret")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    problem = check_files(folder, [{"name": name, "bytes": 6, "sha256": "0" * 64}])
    assert problem is not None and "not a plain name inside the checkpoint" in problem


def test_a_manifest_file_that_links_outside_is_refused(tmp_path):
    (tmp_path / "outside.txt").write_text("secret")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "shard").symlink_to(tmp_path / "outside.txt")
    problem = check_files(folder, [{"name": "shard", "bytes": 6, "sha256": "0" * 64}])
    assert problem is not None and "symbolic link" in problem


@pytest.mark.parametrize("latest", ["../../../../etc", "/etc", "step_000002/../../other", "step_2"])
def test_latest_may_only_name_a_checkpoint_beside_it(tmp_path, latest):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(latest)
    with pytest.raises(CheckpointError, match="not a step_NNNNNN folder"):
        resolve_init(tmp_path)


def test_latest_resolves_inside_the_folder(tmp_path):
    (tmp_path / "latest").write_text("step_000002\n")
    assert latest_of(tmp_path) == tmp_path / "step_000002"


def test_a_folder_whose_name_and_manifest_disagree_is_reported_not_used(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_000002").symlink_to(REAL)
    (root / "step_000025").symlink_to(REAL)  # a link (or copy) of step 2 under another step's name
    with pytest.raises(CheckpointError, match="name says step 25 but its manifest says step 2"):
        verify(root / "step_000025")
    found = CheckpointStore(root).newest_intact()
    assert found.path == root / "step_000002"
    assert "step 25" in found.skipped[0]


def test_a_manifest_config_is_held_to_the_files_before_anything_is_allocated(tmp_path, monkeypatch):
    """Issue 35 item 10: a manifest config with vocab_size 3e6 passed inspect, and load_model / to-hf /
    export allocated gigabytes before comparing shapes. The recorded config is checked against `.metadata`
    (vouched for by the manifest) first: refused by name, and the huge model is never built."""
    import shutil

    import moeyard
    from moeyard.models import Transformer as RealTransformer
    from moeyard.tools.hf_convert import export_hf
    from moeyard.tools.inspect_checkpoint import export_safetensors, inspect_checkpoint

    target = tmp_path / "step_000002"
    shutil.copytree(REAL, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["config"]["model"]["vocab_size"] = 3_000_000
    (target / "manifest.json").write_text(json.dumps(manifest))
    built = []

    class Counting(RealTransformer):
        def __init__(self, cfg):
            if torch.get_default_device().type != "meta":  # a meta-device build allocates nothing
                built.append(cfg.vocab_size)
            super().__init__(cfg)

    monkeypatch.setattr("moeyard.models.build.Transformer", Counting)  # every model is built by build_model
    for attempt in (lambda: moeyard.load_model(target), lambda: export_safetensors(target, tmp_path / "out"),
                    lambda: export_hf(target, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="the manifest's model config makes tok_embeddings.weight"):
            attempt()
    text, intact = inspect_checkpoint(target)
    assert not intact and "the manifest's model config makes" in text
    assert 3_000_000 not in built, "a model was built from the edited config before the check"
