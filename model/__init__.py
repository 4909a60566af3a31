"""The network and everything that trains it."""
from .config import ModelConfig
from .transformer import KVCache, Transformer
from .checkpoint import load_model, save_model

__all__ = ["ModelConfig", "Transformer", "KVCache", "load_model", "save_model"]
