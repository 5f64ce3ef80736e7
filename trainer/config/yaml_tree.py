"""YAML and `--set key=value` overrides to a tree, and a tree to typed dataclasses.

Generic over the dataclasses: `moeyard.trainer.config.sections` defines the run's config and its checks.
Unknown keys and wrong types raise `ConfigError` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from moeyard.errors import ConfigError, require
from moeyard.models.config import MoEConfig


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; ints widen to floats, nothing else is coerced."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) > 1:  # one scalar or a list of them (bool | list[bool]): the value's shape picks the arm
            listed = [a for a in arms if typing.get_origin(a) is list]
            arms = listed if isinstance(value, list) else [a for a in arms if a not in listed]
        (inner,) = arms
        return _convert(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        require(value in choices, f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):  # one item, as `--set train.frozen=layers.*.attn.*` gives it
            value = [value]
        require(isinstance(value, list), f"{key}={value!r} must be a list")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        require(isinstance(value, dict), f"{key} must be a mapping of keys, got {value!r}")
        return build_dataclass(hint, value, key)
    if hint is bool:
        require(isinstance(value, bool), f"{key}={value!r} must be true or false")
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{key}={value!r} must be an integer")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a number")
        require(abs(value) < 1e308 and math.isfinite(value), f"{key}={value!r} must be a finite number")
        return float(value)
    elif hint is str:
        require(isinstance(value, str), f"{key}={value!r} must be a string")
    return value


def build_dataclass(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """`cls` from `data`; a class with `upgrade_keys` first moves the keys it renamed to where they live now."""
    if hasattr(cls, "upgrade_keys"):
        data = cls.upgrade_keys(data, prefix)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(known)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


RENAMED = {f"model.moe.{old}": f"model.moe.{section}.{new}" for old, (section, new) in MoEConfig.LEGACY_KEYS.items()}
"""Overrides of a key that has moved, by its old name: applied where it lives now, so that they override it."""


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    require(bool(sep) and bool(key), f"override {assignment!r} must look like key.path=value")
    key = RENAMED.get(key.strip(), key)
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        require(isinstance(node, dict), f"override {assignment!r}: {part!r} is not a section")
    node[leaf] = _override_value(raw)


def _override_value(raw: str) -> Any:
    """YAML, or the raw text where YAML cannot read it (`train.frozen=*.experts.*`: a leading * is a YAML
    alias)."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw.strip()


def read_tree(path: Optional[str | Path], overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The config as a plain tree: YAML (or nothing, for the defaults) with the overrides applied."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: give the YAML file (a run folder's is "
                              f"{path / 'config.yaml'})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        require(isinstance(tree, dict), f"config file {path} must hold a mapping at the top level")
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("moe"), dict):  # the file's own old keys, before overrides
        model["moe"] = MoEConfig.upgrade_keys(model["moe"], "model.moe")
    for assignment in overrides:
        _apply_override(tree, assignment)
    if tree.get("schedule") in (False, "off"):  # `schedule: off` as shorthand for schedule.mode=off
        tree["schedule"] = {"mode": "off"}
    return tree
