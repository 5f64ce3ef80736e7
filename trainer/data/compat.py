"""Does the data fit the model? Checked from meta.json and checkpoint manifests, before any worker starts.

A corpus must be tokenized the way the model was: its ids must fit the embedding (model.vocab_size), the
sources of a blend must share one tokenizer, and a checkpoint that records a tokenizer (an imported HF
model's, or the corpus a run trained on) must name the same one. Each refusal names both sides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from moeyard.errors import DataError
from moeyard.trainer.config.sections import Config, DataConfig
from moeyard.trainer.data.blend import CorpusSource


def corpus_sources(data: DataConfig) -> list[CorpusSource]:
    """The corpora a pretraining run reads: data.sources, or the one data.dir (named "data")."""
    if data.sources:
        return [CorpusSource(s.label, Path(s.dir), s.weight) for s in data.sources]
    if data.dir is None:
        raise DataError("data.dir is not set: the launcher resolves it (see trainer.data.tokens.ensure_corpus)")
    return [CorpusSource("data", Path(data.dir))]


def describe(tokenizer: dict[str, Any]) -> str:
    return f"{tokenizer.get('name')!r} (vocabulary {tokenizer.get('vocab_size')}, hash {tokenizer.get('hash')})"


def checkpoint_tokenizer(manifest: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The tokenizer a checkpoint's model was trained with, if it records one: the corpus of a moeyard run,
    or the tokenizer an imported HF folder carried."""
    data = manifest.get("data") or {}
    return data.get("tokenizer") or (manifest.get("source") or {}).get("tokenizer")


def check_tokenizers(cfg: Config, metas: dict[str, dict[str, Any]],
                     checkpoints: list[tuple[str, dict[str, Any]]]) -> None:
    """`metas`: each source's meta.json by name; `checkpoints`: (what, manifest) of the checkpoints the run
    will load (checkpoint.init, the one it resumes from)."""
    (first, first_meta), *rest = metas.items()
    for name, meta in rest:
        if meta["tokenizer"]["hash"] != first_meta["tokenizer"]["hash"]:
            raise DataError(f"data.sources {first!r} and {name!r} were tokenized differently: "
                            f"{describe(first_meta['tokenizer'])} vs {describe(meta['tokenizer'])}; prepare them "
                            f"with one tokenizer")
    for name, meta in metas.items():
        need = meta["vocab_size"]
        if cfg.model.vocab_size < need:
            raise DataError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {need} token ids of the "
                            f"corpus {name!r} (tokenizer {describe(meta['tokenizer'])}): set model.vocab_size to at "
                            f"least {need}, or prepare the data with the model's tokenizer")
    corpus = first_meta["tokenizer"]
    for what, manifest in checkpoints:
        recorded = checkpoint_tokenizer(manifest)
        if recorded is None and (manifest.get("source") or {}).get("format") == "huggingface":
            # imported (or upcycled) from an HF folder that had no tokenizer.json
            if corpus["hash"] == "bytes":
                raise DataError(f"{what} was imported from {manifest['source'].get('dir')} without a tokenizer, and "
                                f"the corpus {first!r} holds byte ids, which that model never saw: prepare the data "
                                f"with the model's tokenizer (moeyard prepare ... --tokenizer ITS_FOLDER), or put its "
                                f"tokenizer.json in the HF folder and import it again")
            print(f"warning: {what} records no tokenizer (its HF folder had no tokenizer.json): the corpus "
                  f"{first!r}'s {describe(corpus)} is assumed to be the model's", flush=True)
        if recorded is not None and recorded.get("hash") != corpus["hash"]:
            raise DataError(f"{what} was trained with tokenizer {describe(recorded)}, but the corpus {first!r} was "
                            f"prepared with {describe(corpus)}: prepare the data with the checkpoint's tokenizer "
                            f"(moeyard prepare ... --tokenizer {recorded.get('dir', 'ITS_FOLDER')})")


def data_record(metas: dict[str, dict[str, Any]], sources: list[CorpusSource]) -> dict[str, Any]:
    """What a checkpoint records of its data: the tokenizer (with the folder of its files) and each source's
    folder and content hash."""
    first_dir, first = sources[0].dir, metas[sources[0].name]
    tokenizer = dict(first["tokenizer"])
    if "dir" in tokenizer:
        tokenizer["dir"] = str((first_dir / tokenizer["dir"]).resolve())
    return {"tokenizer": tokenizer,
            "sources": {s.name: {"dir": str(s.dir.resolve()), "content_hash": metas[s.name].get("content_hash")}
                        for s in sources}}
