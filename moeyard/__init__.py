"""moeyard: expert-parallel training of sparse Mixture-of-Experts language models.

Public API (stable): `moeyard.load_model(path)`, `moeyard.load_config(path, overrides)`; error types in
`moeyard.errors`. Imported on first use, so `import moeyard` stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_config", "load_model"]

if TYPE_CHECKING:
    from moeyard.api import load_config, load_model


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moeyard import api

        return getattr(api, name)
    raise AttributeError(f"module 'moeyard' has no attribute {name!r}")
