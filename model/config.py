"""Model configuration: one dataclass, named presets, and Llama-compatible config.json read/write."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.io import read_json, write_json

# Architectures we can read, by the `architectures[0]` / `model_type` of a Hugging Face config.json.
LLAMA, QWEN2, BAICHUAN = "LlamaForCausalLM", "Qwen2ForCausalLM", "BaiChuanForCausalLM"
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, BAICHUAN)
# weight dtypes a model loads in (--dtype), by torch's names: model/chat.py maps them to torch dtypes
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_MODEL_TYPES = {LLAMA: "llama", QWEN2: "qwen2", BAICHUAN: "baichuan"}


@dataclass
class ModelConfig:
    """Shape and numerics of the decoder. Field names follow Hugging Face's LlamaConfig."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    intermediate_size: int = 2048
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama semantics: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2 semantics: bias on q, k, v only
    initializer_range: float = 0.02
    architecture: str = LLAMA  # the checkpoint format read (Baichuan's W_pack is split on load; saved as Llama)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.qkv_bias and not self.attention_bias and self.architecture == LLAMA:
            self.architecture = QWEN2  # Llama has no q/k/v-only bias; transformers reads it as Qwen2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, L, v = self.hidden_size, self.num_hidden_layers, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2 + (d + 2 * kv) * (self.qkv_bias or self.attention_bias) + d * self.attention_bias
        mlp = 3 * d * self.intermediate_size
        return v * d * (1 if self.tie_word_embeddings else 2) + L * (attn + mlp + 2 * d) + d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- config.json -------------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers reads as LlamaForCausalLM (or Qwen2ForCausalLM for q/k/v-bias models)."""
        arch = QWEN2 if self.architecture == QWEN2 else LLAMA
        d = {
            "architectures": [arch],
            "model_type": _MODEL_TYPES[arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if arch == LLAMA:
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        else:
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a Llama, Qwen2/Qwen1.5 or Baichuan-7B config.json. Unknown architectures raise, naming the file."""
        arch = (d.get("architectures") or [None])[0]
        model_type = d.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            by_type = {v: k for k, v in _MODEL_TYPES.items()}
            arch = by_type.get(model_type)
        if arch is None:
            raise ValueError(f"{source}: unsupported architecture {d.get('architectures')} (model_type "
                             f"{model_type!r}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in d:
                raise ValueError(f"{source}: missing key {key!r}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if head_dim * heads != d["hidden_size"]:
            raise ValueError(f"{source}: head_dim {head_dim} x heads {heads} != hidden_size {d['hidden_size']}")
        rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        scaling = d.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"{source}: rope_scaling {scaling} is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),  # Baichuan-7B hard-codes 10000 and has no key
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) if arch == LLAMA else False,
            qkv_bias=arch == QWEN2,
            initializer_range=d.get("initializer_range", 0.02),
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_hf_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf_dict(read_json(path, "no config.json (not a model directory)"), source=str(path))


PRESETS: dict[str, ModelConfig] = {
    # ~2M parameters with an 8k vocabulary: trains a few hundred steps on 2 CPU cores in a minute or two.
    "tiny": ModelConfig(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512),
    # ~0.1B: 768 wide, 12 layers.
    "small": ModelConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=1024),
    # ~0.25B
    "base": ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=8, intermediate_size=2816, max_position_embeddings=2048),
    # ~0.5B
    "medium": ModelConfig(vocab_size=32000, hidden_size=1536, num_hidden_layers=16, num_attention_heads=12,
                          num_key_value_heads=4, intermediate_size=4096, max_position_embeddings=2048),
}
