"""Shipped YAML configs (data only); `path(name)` finds one by file name."""
from pathlib import Path


def path(name: str) -> Path:
    return Path(__file__).with_name(name)
