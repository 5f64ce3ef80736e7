"""Shipped YAML configs (data only); `path(name)` finds one, e.g. path("hardware/dgx-h100.yaml")."""
from pathlib import Path


def path(name: str) -> Path:
    return Path(__file__).parent / name
