"""The config a run actually uses: YAML + overrides, the model section of `checkpoint.init`, and the
freezing patterns checked against the model, all before any worker starts.

`trainer.config` parses and validates what the file itself says; this module adds
the checks that read a checkpoint or build a (meta-device) model, for the commands
that need them: train/sft, slurm, plan, sft-eval, the worker, and `moeyard.load_config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from moeyard.trainer.checkpoint.store import CheckpointStore
from moeyard.trainer.checkpoint.weights import init_model_config, merge_model_config, resolve_init
from moeyard.trainer.config import Config, build_config, config_from_tree, read_tree
from moeyard.trainer.freezing import frozen_set


def _resume_source(tree: dict[str, Any]) -> Optional[Path]:
    """The checkpoint a run with this config tree would resume from, if any (not verified here)."""
    resume = (tree.get("checkpoint") or {}).get("resume", "auto")
    if resume == "none":
        return None
    if resume != "auto":
        return Path(resume)
    run = build_config({"run": tree.get("run") or {}}).run
    return CheckpointStore(Path(run.dir.format(name=run.name)) / "checkpoints").newest_readable()


def with_init_model(tree: dict[str, Any]) -> dict[str, Any]:
    """checkpoint.init resolved to a checkpoint folder, and the model section taken from it: the user's
    config may change only what keeps the weights' shapes. A resumed run keeps its own model, even if
    init has moved on since."""
    init = (tree.get("checkpoint") or {}).get("init")
    if not init:
        return tree
    path = resolve_init(Path(init))
    tree.setdefault("checkpoint", {})["init"] = str(path)
    source = _resume_source(tree) or path
    tree["model"] = merge_model_config(init_model_config(source), tree.get("model"), source)
    return tree


def resolve_config(path: Optional[str | Path], overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """What `moeyard train CONFIG --set ...` runs with. Raises ConfigError naming the key and the fix."""
    cfg = config_from_tree(with_init_model(read_tree(path, overrides)))
    frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen)  # patterns that match nothing fail here
    return cfg
