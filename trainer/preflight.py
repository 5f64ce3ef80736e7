"""Checks of a run against what is on disk, made before any worker starts (and again in each worker):
the checkpoint it will load fits the model, and the corpus holds at least one global batch and was
tokenized as the model was.

They read manifests, DCP metadata (through safe_read) and the corpus's meta.json only: no shard is
opened, so a 671B checkpoint is checked in the time of reading its metadata.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from moeyard.errors import CheckpointError, ConfigError
from moeyard.models.meta_init import shapes_only
from moeyard.trainer.checkpoint.store import CheckpointStore, read_manifest
from moeyard.trainer.config.sections import Config
from moeyard.trainer.data.compat import check_tokenizers, corpus_sources
from moeyard.trainer.data.tokens import check_corpus_size, read_meta


def checkpoint_to_load(cfg: Config) -> tuple[Optional[Path], str]:
    """The checkpoint the run will start from and why ("resume" or "init"); (None, "") for a fresh start.
    With checkpoint.resume=auto: the store's newest readable checkpoint."""
    if cfg.checkpoint.resume not in ("auto", "none"):
        return Path(cfg.checkpoint.resume), "resume"
    if cfg.checkpoint.resume == "auto":
        path = CheckpointStore(cfg.run_dir / "checkpoints").newest_readable()
        if path is not None:
            return path, "resume"
    if cfg.checkpoint.init:
        return Path(cfg.checkpoint.init), "init"
    return None, ""


def check_checkpoint_fits(cfg: Config) -> None:
    """Every weight the checkpoint holds has the shape the configured model needs; refused (naming the
    tensor, both shapes and the fix) before run.dir/config.yaml is rewritten."""
    path, why = checkpoint_to_load(cfg)
    if path is None:
        return
    key = "checkpoint.init" if why == "init" else "resuming"
    from moeyard.trainer.checkpoint import safe_read  # DCP: a second's import, paid only with a checkpoint

    try:
        saved = safe_read.read_metadata(path).state_dict_metadata
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}") from None
    model = shapes_only(cfg.model)
    for name, param in model.named_parameters():
        md = saved.get(f"model.{name}")
        if md is not None and tuple(md.size) != tuple(param.shape):
            fix = ("resume with the model config it was saved with (its manifest.json has it), or start a new "
                   "run.dir" if why == "resume" else "remove the model keys that change shapes")
            raise ConfigError(f"{key} {path}: model.{name} is {tuple(md.size)} there, the configured model "
                              f"makes {tuple(param.shape)}: {fix}")


def check_pretraining_data(cfg: Config) -> dict[str, dict]:
    """Each corpus of the run (data.dir, or data.sources) read and checked: together at least one global
    batch, tokenized as the model and the checkpoints it loads were. Returns their meta.json by name."""
    sources = corpus_sources(cfg.data)
    metas = {s.name: read_meta(s.dir) for s in sources}
    every = {"shards": [shard for meta in metas.values() for shard in meta["shards"]]}
    where = sources[0].dir if len(sources) == 1 else Path(", ".join(str(s.dir) for s in sources))
    check_corpus_size(where, every, cfg.train.seq_len, cfg.global_batch_sequences)
    checkpoints = []
    for path, why in {checkpoint_to_load(cfg), (Path(cfg.checkpoint.init) if cfg.checkpoint.init else None, "init")}:
        if path is not None and why:
            try:
                checkpoints.append((f"the checkpoint {path} ({'checkpoint.init' if why == 'init' else why})",
                                    read_manifest(path)))
            except CheckpointError:
                pass  # check_checkpoint_fits names what is wrong with it
    check_tokenizers(cfg, metas, checkpoints)
    return metas


def check_inputs(cfg: Config, prepare: bool = True) -> None:
    """What a run reads, checked before any worker (or batch job) starts: the SFT conversations, or the
    corpus against the model; and the checkpoint a resume would load. `prepare`: tokenize a corpus that
    is not prepared yet (the launcher does, once per machine); else only a prepared one is checked."""
    if cfg.sft.data is not None:
        from moeyard.trainer.data.sft_batches import SFTData

        SFTData(cfg)  # reads, renders and checks every conversation
    elif cfg.data.sources:
        check_pretraining_data(cfg)
    else:
        from moeyard.trainer.data.tokens import corpus_dir, ensure_corpus

        corpus = corpus_dir(cfg.data.source, cfg.data.dir, cfg.data.glob)
        if prepare or (corpus / "meta.json").is_file():
            corpus = ensure_corpus(cfg.data.source, cfg.data.dir, cfg.data.glob)
            check_pretraining_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(corpus))))
    check_checkpoint_fits(cfg)
