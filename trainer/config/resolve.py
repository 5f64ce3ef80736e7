"""The config a run actually uses, resolved once: YAML + overrides, the model section of `checkpoint.init`,
the freezing patterns checked against the model, the corpus location, and -- given the machine each rank
runs on -- the world checks, the node layout and (given a memory budget) the memory fit.

`moeyard train` resolves here once and writes the result to run.dir, where its workers read it as it is
(`read_resolved`); a worker started by srun, mpirun or a bare torchrun resolves here once, after it has
learnt the machines. `trainer.config.sections` parses and validates what the file itself says; this
module adds what reads a checkpoint, builds a (meta-device) model or needs the machines.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from moeyard.errors import CheckpointError, ConfigError, LaunchError
from moeyard.models import ModelConfig, MoEConfig
from moeyard.trainer.checkpoint.store import CheckpointStore, read_manifest, resolve_init
from moeyard.trainer.config.node_layout import node_layout_notes, ranks_per_machine, with_node_layout
from moeyard.trainer.config.sections import Config, build_config, config_from_tree, dump_yaml, validate_for_world
from moeyard.trainer.config.yaml_tree import read_tree
from moeyard.trainer.data.tokens import default_data_dir
from moeyard.trainer.freezing import frozen_set
from moeyard.trainer.scheduler.memory_fit import MemoryBudget, fit_memory


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


def _with_corpus_location(cfg: Config) -> Config:
    """data.dir filled where data.source names the corpus (this machine's cache folder for it): the folder
    the first worker of each machine prepares, and every rank reads."""
    data = cfg.data
    if cfg.sft.data is not None or data.sources or data.dir is not None or data.source is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(data, dir=str(default_data_dir(data.source, data.glob))))


def _ranks_per_machine(cfg: Config, machines: Sequence[str]) -> int:
    """parallel.ranks_per_node, else how many consecutive ranks share each machine. Ranks not placed machine
    by machine count as one machine (flat dispatch does not care where ranks run), unless the config needs
    machines."""
    if cfg.parallel.ranks_per_node is not None:
        return cfg.parallel.ranks_per_node
    G = ranks_per_machine(machines)
    if G is not None:
        return G
    if cfg.schedule.dispatch == "hierarchical" or cfg.model.moe.max_nodes_per_token is not None:
        placed: dict[str, list[int]] = {}
        for rank, machine in enumerate(machines):
            placed.setdefault(machine, []).append(rank)
        where = "; ".join(f"{machine}: ranks {ranks}" for machine, ranks in placed.items())
        raise LaunchError(f"ranks are not placed machine by machine ({where}): hierarchical dispatch and "
                          f"node-limited routing need every machine to hold as many consecutive ranks "
                          f"(Slurm --distribution=block, mpirun --map-by slot), or parallel.ranks_per_node")
    return len(machines)


def _fit(cfg: Config, machines: Sequence[str], budget: MemoryBudget, say: Callable[[str], None]) -> Config:
    """The run that fits `budget` (schedule.mode=auto may choose one). Every machine decides alone from the
    memory it sees, so with several machines auto names what to set instead of choosing."""
    fitted, overrides, message = fit_memory(cfg, len(machines), budget)
    machine_count = len(set(machines))
    if overrides and machine_count > 1:
        raise ConfigError(f"{message}; with {machine_count} nodes set these on every node's command line "
                          f"(--set {' --set '.join(overrides)}) so that all nodes run the same layout")
    say(message)
    return fitted


def resolve_run(path: Optional[str | Path], overrides: Sequence[str] = (), machines: Optional[Sequence[str]] = None,
                memory: Optional[Callable[[Config], Optional[MemoryBudget]]] = None,
                say: Callable[[str], None] = lambda line: None) -> Config:
    """What `moeyard train PATH --set OVERRIDE ...` runs with. `machines`: the machine each rank runs on, in
    rank order (the world is its length); without it nothing that needs the world is checked or filled.
    `memory`: each rank's budget for this config (None: unknown), for the memory fit. `say` receives the
    notes on the layout and the memory line. Raises ConfigError (LaunchError for a placement that cannot
    work) naming the key and the fix."""
    cfg = config_from_tree(with_init_model(read_tree(path, list(overrides))))
    frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen)  # patterns that match nothing fail here
    cfg = _with_corpus_location(cfg)
    if machines is None:
        return cfg
    validate_for_world(cfg, len(machines))
    G = _ranks_per_machine(cfg, machines)
    if cfg.schedule.mode == "auto" and cfg.schedule.hardware:  # the planner chooses pp, ep, schedule, layout
        from moeyard.trainer.scheduler.stage_search import choose_stages  # only here: it imports the planner

        cfg, chosen = choose_stages(cfg, len(machines), G)
        say(chosen)
    for note in node_layout_notes(cfg, G):
        say(f"note: {note}")
    cfg = with_node_layout(cfg, len(machines), G)
    _check_every_stage_trains(cfg)
    budget = memory(cfg) if memory is not None and cfg.schedule.memory_check else None
    return _fit(cfg, machines, budget, say) if budget is not None and budget.capacity_gb else cfg


def _check_every_stage_trains(cfg: Config) -> None:
    """A pipeline rank whose parameters are all frozen (train.trainable, train.frozen, adapters) would build an
    optimizer of nothing: refused before launch, naming the rank."""
    p = cfg.parallel
    frozen = frozen_set(cfg.model, cfg.train.trainable, cfg.train.frozen)
    if p.pp == 1 or not frozen:
        return
    from moeyard.parallel.stages import holds_ends
    from moeyard.trainer.scheduler.memory_model import count_parameters, stage_blocks

    sizes = tuple(p.layers_per_stage or ())
    for rank in range(p.pp):
        counts = count_parameters(cfg.model, 1, frozen, rank, p.pp, cfg.stages_per_rank, sizes, v_shape=cfg.v_shape)
        if counts.dense_trainable + counts.experts_trainable == 0:
            held = stage_blocks(cfg.model, rank, p.pp, cfg.stages_per_rank, sizes, cfg.v_shape)
            first, last = holds_ends(rank, p.pp, cfg.v_shape)
            what = [f"blocks {list(held)}" if held else "no block"] + ["the embedding"] * first + \
                ["the final norm and output layer"] * last
            raise ConfigError(f"pipeline rank {rank} of parallel.pp={p.pp} holds {', '.join(what)}, and none of "
                              f"its parameters trains (train.trainable, train.frozen, model.peft): give it blocks "
                              f"that train (parallel.layers_per_stage) or let some of its parameters train")


def machines_of(world: int, ranks_per_machine: int) -> list[str]:
    """Machine names for `world` ranks placed `ranks_per_machine` at a time, as moeyard's launcher places them."""
    return [f"node{rank // ranks_per_machine}" for rank in range(world)]


def write_resolved(cfg: Config, path: Path) -> Path:
    """The resolved config for a node's workers, written whole and then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(path)
    return path


def read_resolved(path: str | Path) -> Config:
    """A config `write_resolved` wrote, as it is: nothing is looked up or chosen again."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the resolved run config {path}: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a resolved run config (a YAML mapping)")
    return build_config(tree)


def init_model_config(path: Path) -> dict[str, Any]:
    """The model section recorded in a checkpoint (its files are checked when the run loads it)."""
    try:
        return read_manifest(path)["config"]["model"]
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.init={path}: {err}. Give a checkpoint folder (moeyard convert writes one; "
                          f"`moeyard train` writes runs/NAME/checkpoints/step_*), or a run folder") from None


def merge_model_config(init_model: dict[str, Any], user_model: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """The checkpoint's model config; the user's config may change only what keeps the weights' shapes."""
    merged = copy.deepcopy(init_model)
    user_model = copy.deepcopy(user_model or {})
    if isinstance(merged.get("moe"), dict):  # router settings written as flat keys by older versions
        merged["moe"] = MoEConfig.upgrade_keys(merged["moe"], "the checkpoint's model.moe")
    if isinstance(user_model.get("moe"), dict):
        user_model["moe"] = MoEConfig.upgrade_keys(user_model["moe"], "model.moe")
    shaped = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "attn_bias",
              "qk_norm", "tie_embeddings", "attention", "mla", "mtp_layers")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    shaped_moe = ("num_experts", "num_experts_per_layer", "ffn_dim", "num_shared_experts", "shared_ffn_dim",
                  "shared_expert_gate", "every", "first_dense_layers")
    for key, value in user_model.items():
        if key == "moe" and isinstance(value, dict):
            for k, v in value.items():
                if k in shaped_moe and v != merged["moe"].get(k):
                    raise ConfigError(f"model.moe.{k}={v!r} differs from the checkpoint {path} "
                                      f"({merged['moe'].get(k)!r}) the run starts from: remove it from the config")
                if isinstance(v, dict) and isinstance(merged["moe"].get(k), dict):  # a router's section
                    merged["moe"][k] = {**merged["moe"][k], **v}
                else:
                    merged["moe"][k] = v
            continue
        recorded = merged.get(key, defaults.get(key))  # older checkpoints lack newer keys: their default
        if key in shaped and value != recorded:
            raise ConfigError(f"model.{key}={value!r} differs from the checkpoint {path} "
                              f"({recorded!r}) the run starts from: remove it from the config")
        merged[key] = value
    return merged
