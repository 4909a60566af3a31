"""Chat with a model: load a model directory (and a LoRA adapter) for generation, and a conversation whose history
goes back to the model through the chat template. cli_demo.py, serve.py and the notebook all start here.

    model, tokenizer = load_chat_model("runs/sft/latest")
    chat = Chat.start(model, tokenizer, temperature=0.0)
    for piece in chat.reply("你好"): print(piece, end="")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.templates import ChatTemplate
from utils.tokenizer import Tokenizer

from .checkpoint import load_base
from .config import DTYPE_NAMES
from .generation import (
    SamplingConfig,
    TextStream,
    chat_prompt,
    context_budget,
    default_stop_ids,
    resolve_template,
    stream,
)
from .transformer import Transformer

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA (float16 without bf16 support), float16 on MPS, float32 on the CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def load_chat_model(model_dir: str | Path, lora: str | Path | None = None, qlora: bool = False,
                    device: str = "auto", dtype: str = "auto") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) of a model directory that holds its tokenizer, with an adapter (ours or PEFT's) applied."""
    from .lora import load_adapter
    path = Path(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = load_base(path, torch_dtype, torch_device, qlora)
    if lora:
        load_adapter(model, lora, dtype=torch_dtype)  # adapters are created on the base weights' device
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                                "tokenizer.model); save the model with its tokenizer")
    return model, Tokenizer.load(path)


@dataclass
class Chat:
    """History as chat messages; every question is asked with the whole (trimmed) history in the prompt: when the
    earlier turns no longer fit the context window the oldest are dropped, never the current question."""

    model: Transformer
    tokenizer: Tokenizer
    template: ChatTemplate
    config: SamplingConfig
    system: str | None = None
    compile: bool = False
    turns: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, model: Transformer, tokenizer: Tokenizer, template: str | ChatTemplate | None = None,
              system: str | None = None, compile: bool = False, **sampling) -> Chat:
        """A new conversation; `template` None is the tokenizer's own, `sampling` holds SamplingConfig fields. The
        model stops at the template's end of turn. Fails now, not at the first question, when nothing fits."""
        template = resolve_template(template, tokenizer)
        config = SamplingConfig(stop_ids=default_stop_ids(tokenizer, template), **sampling)
        context_budget(model, config)
        return cls(model, tokenizer, template, config, system, compile)

    def reply(self, question: str) -> TextStream:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.turns
        messages.append({"role": "user", "content": question})
        ids = chat_prompt(self.tokenizer, messages, self.template, context_budget(self.model, self.config))
        return stream(self.model, ids, self.config, self.tokenizer, self.template.stop_strings, self.compile)

    def record(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def clear(self) -> None:
        self.turns.clear()
