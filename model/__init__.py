"""The network and what loads or adapts it.

The names below load their module (and torch) on first use, so that importing a light part of the package
(`model.config`, which the command line's option definitions need) does not import torch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load_model, save_model
    from .config import ModelConfig
    from .transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache", "load_model", "save_model"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "save_model"):
        from . import checkpoint as module
    elif name == "ModelConfig":
        from . import config as module
    elif name in ("Transformer", "KVCache"):
        from . import transformer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
