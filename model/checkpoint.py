"""Model directories: Hugging Face-style `config.json` + safetensors, read and written.

Reads our directories, HF Llama, Qwen2 / Qwen1.5 (q/k/v bias) and Baichuan-7B (fused `W_pack`, split here into
q/k/v: the one place that mapping lives). Weights are assigned one tensor at a time into a model built on the meta
device, in the requested dtype, so a 7B checkpoint never needs a float32 copy or two copies of its weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from utils.io import atomic_dir, write_json

from .config import BAICHUAN, ModelConfig
from .transformer import Transformer

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3
_SKIPPED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # persistent buffers in Baichuan / old Llama dumps
_W_PACK = re.compile(r"(model\.layers\.\d+\.self_attn\.)W_pack\.weight$")

# A hook that may take over a tensor while loading (QLoRA quantizes base linears here, one tensor at a time).
# Called as hook(model, key, tensor); returns True when it consumed the tensor.
TensorHook = Callable[[Transformer, str, torch.Tensor], bool]


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the key and the file."""


# ---- writing -----------------------------------------------------------------------------------------------------
def model_state(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state to save (the model's own, or `state`, e.g. gathered from FSDP shards): HF key names, the tied
    lm_head dropped (transformers re-ties it), contiguous tensors."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_model_files(model: Transformer, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, generation_config.json and (sharded) safetensors into an existing directory; `state`
    replaces the model's own tensors (see model_state)."""
    state = model_state(model, state)
    dtype = next(iter(state.values())).dtype
    config = model.config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(out_dir / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_model(model: Transformer, path: str | Path, tokenizer=None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a model directory atomically (temp dir + rename). `tokenizer` (anything with `.save(dir)`) is
    written into the same directory so it is chat-ready."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


# ---- reading -----------------------------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """Safetensors (sharded or not) first; legacy pytorch_model*.bin only when no safetensors exist."""
    for index_name, pattern in ((SAFE_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid weight index ({e})") from None
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
            return files
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path}: no model.safetensors, *.safetensors or pytorch_model*.bin weights found")


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
            with handle:
                for key in handle.keys():
                    try:
                        tensor = handle.get_tensor(key)
                    except Exception as e:
                        raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None
                    yield f, key, tensor
        else:  # legacy pickle: tensors only, never arbitrary objects
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read weights with weights_only=True ({e})") from None
            for key, tensor in state.items():
                yield f, key, tensor


def hf_to_ours(key: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Map one checkpoint tensor to our parameter names (Baichuan's W_pack rows are q || k || v)."""
    if _SKIPPED_KEYS.match(key):
        return []
    m = _W_PACK.match(key)
    if m and config.architecture == BAICHUAN:
        q, k, v = tensor.chunk(3, dim=0)
        return [(m.group(1) + f"{name}_proj.weight", t) for name, t in zip("qkv", (q, k, v))]
    return [(key, tensor)]


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               tensor_hook: TensorHook | None = None) -> Transformer:
    """Load a model directory into a ready `Transformer` (eval mode).

    dtype: None keeps the checkpoint's dtype. Every missing, unexpected or mis-shaped key raises a CheckpointError
    naming the key and its file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    config = ModelConfig.load(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen: set[str] = set()
    for file, raw_key, raw in iter_tensors(files):
        for key, tensor in hf_to_ours(raw_key, raw, config):
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if key not in expected:
                raise CheckpointError(f"{file}: unexpected key {raw_key!r} for {config.architecture}")
            if tuple(tensor.shape) != tuple(expected[key]):
                raise CheckpointError(f"{file}: key {raw_key!r} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected[key])} from config.json")
            tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
            if tensor_hook is None or not tensor_hook(model, key, tensor):
                _assign(model, key, tensor)
            seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing keys {shown} (files: {', '.join(f.name for f in files)})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.reset(torch.device(device))
    return model.eval()


@torch.no_grad()
def load_weights_into(model: Transformer, path: str | Path) -> None:
    """Copy a model directory's weights into an existing model in place (resume: same shapes, same dtype)."""
    params = model.state_dict()
    seen = set()
    for file, raw_key, raw in iter_tensors(weight_files(Path(path))):
        for key, tensor in hf_to_ours(raw_key, raw, model.config):
            if key not in params or params[key].shape != tensor.shape:
                raise CheckpointError(f"{file}: key {raw_key!r} does not fit this model")
            params[key].copy_(tensor)
            seen.add(key)
    missing = set(params) - seen - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(sorted(missing)[:5])}")


def load_base(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
              qlora: bool = False) -> Transformer:
    """A base model for adapters; with `qlora` the block linears become NF4 one tensor at a time while loading, so the
    full-precision weights are never all in memory."""
    from .nf4 import nf4_hook
    return load_model(path, dtype=dtype, device=device, tensor_hook=nf4_hook() if qlora else None)
