"""LoRA (Hu et al., 2021) on our decoder, with PEFT's exact math and on-disk adapter format.

For a frozen base linear W [out, in] (an `nn.Linear`, or an `NF4Linear` for QLoRA):

    y = base(x) + s * B(A(dropout(x)))        A: [r, in], B: [out, r]
    s = alpha / r        (or alpha / sqrt(r) with rsLoRA)
    A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0, so a fresh adapter is an exact identity.

    merge:   W <- W + s * B @ A      (delta computed in fp32, then cast to W's dtype)
    unmerge: W <- W - s * B @ A

As in PEFT, x is cast to A's dtype and the update back to the base output's dtype; the update stays two small
matmuls (BA is never materialized in forward).

Baichuan-7B fuses q/k/v into one `W_pack` [3d, d]; a PEFT adapter on it has ONE A [r, d] and ONE B [3d, r]. Our
decoder holds q/k/v split, so a `W_pack` target registers one `LoRAAdapter` at `self_attn.W_pack` (the PEFT key
prefix) and q/k/v become `LoRASlice`s that share its A and take row slices of its B:

    u = s * B A dropout(x)   [.., 3d]
    q = W_q x + u[..., 0:d],   k = W_k x + u[..., d:2d],   v = W_v x + u[..., 2d:3d]

which is exactly PEFT-on-Baichuan, in training too: the attention module becomes a `PackedAttention`, whose
`project_qkv` gets q, k, v from one `W_pack.project` call, so the three share one dropout mask and one A x, as the
fused layer does in PEFT (calling each slice alone would draw its own).

`adapters_disabled(model)` runs the base alone (every update and its dropout skipped): DPO's reference for a LoRA
run, with no second copy of the base.

Adapter directories hold `adapter_config.json` and `adapter_model.safetensors` with PEFT's keys:
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from utils.io import atomic_dir, read_json, write_json

from .config import BAICHUAN
from .nf4 import NF4Linear
from .transformer import Attention

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"


@dataclass
class AdapterConfig:
    """What `adapter_config.json` records (PEFT field names in `to_peft_dict`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT module-name pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # PEFT module-name pattern -> alpha
    base_model_name_or_path: str | None = None

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", name) wins."""
        def lookup(patterns: dict, default):
            for p, value in patterns.items():
                if re.match(rf"(.*\.)?({p})$", name):
                    return value
            return default
        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.alpha)

    def to_peft_dict(self) -> dict[str, Any]:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": self.targets,
            "use_rslora": self.use_rslora, "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
            "layer_replication": None, "revision": None, "auto_mapping": None, "megatron_config": None,
            "megatron_core": "megatron.core", "loftq_config": {},
        }


# adapter_config.json keys that change what the adapter computes and that we do not implement: key -> the values
# we accept. Any other key is bookkeeping (revision, peft_version, init_lora_weights, ...) and is ignored.
_UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []), "layers_pattern": (None, [], ""),
    "layer_replication": (None, []), "target_parameters": (None, []), "exclude_modules": (None, [], ""),
    "trainable_token_indices": (None, {}, []), "use_qalora": (False, None), "alora_invocation_tokens": (None, []),
    "megatron_config": (None,), "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,),
}


class LoRAAdapter(nn.Module):
    """The trainable pair: `delta(x) = s * B(A(dropout(x)))`, optionally restricted to a row slice of B."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        # PEFT casts x to the adapter's dtype first. Under autocast the matmul casts it to the autocast dtype anyway
        # and dropout rounds its product the same in either dtype, so the cast is skipped: it would only make a full
        # fp32 copy of x (and an fp32 dropout).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(self.lora_dropout(x))
        return F.linear(h, self.lora_B.weight[rows]) * self.scaling

    def project(self, x: torch.Tensor, slices: Sequence[LoRASlice]) -> list[torch.Tensor]:
        """The outputs of `slices` (the LoRASlices of this adapter) from ONE update over all of B's rows, split by
        rows: PEFT's fused-layer math (one dropout mask, one A x), which calling each slice cannot give."""
        results = [s.base_layer(x) for s in slices]
        if slices[0].merged or slices[0].disabled:  # both are set on every slice of an adapter together
            return results
        update = self.delta(x)
        return [y + update[..., s.rows].to(y.dtype) for y, s in zip(results, slices)]

    def delta_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """s * B[rows] @ A in fp32: the [out, in] update that merging adds to W."""
        return (self.lora_B.weight[rows].float() @ self.lora_A.weight.float()) * self.scaling


class LoRALinear(LoRAAdapter):
    """A frozen `base_layer` plus its own adapter: y = base(x) + s * B(A(dropout(x))) (PEFT key layout)."""

    rows = slice(None)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__(base_layer.in_features, base_layer.out_features, r, alpha, dropout, use_rslora,
                         device=_base_device(base_layer), dtype=dtype)
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False

    @property
    def adapter(self) -> LoRAAdapter:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lora_forward(self, x)


class LoRASlice(nn.Module):
    """A frozen `base_layer` whose update is rows `rows` of a shared (fused) adapter registered elsewhere. Calling it
    alone draws its own dropout mask; `Attention` runs all slices of an adapter at once (`LoRAAdapter.project`)."""

    def __init__(self, base_layer: nn.Module, adapter: LoRAAdapter, rows: slice):
        super().__init__()
        self.base_layer, self.rows = base_layer, rows
        self._adapter = (adapter,)  # a tuple, so the shared adapter is registered (and saved) once, at W_pack
        self.merged = False
        self.disabled = False

    @property
    def adapter(self) -> LoRAAdapter:
        return self._adapter[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lora_forward(self, x)


LoRAWrapped = LoRALinear | LoRASlice


class PackedAttention(Attention):
    """Attention whose q/k/v updates are row slices of one fused adapter at `W_pack` (Baichuan)."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.W_pack.project(x, (self.q_proj, self.k_proj, self.v_proj)))


def _lora_forward(layer: LoRAWrapped, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    if layer.merged or layer.disabled:
        return result
    return result + layer.adapter.delta(x, layer.rows).to(result.dtype)


def _base_device(base: nn.Module) -> torch.device:
    return base.weight.device


# ---- applying ----------------------------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> dict[str, list[str]]:
    """PEFT-visible linear modules -> our module paths. lm_head is never a candidate. In a model read from a
    Baichuan checkpoint, the PEFT name `...self_attn.W_pack` stands for our q/k/v."""
    baichuan = getattr(getattr(model, "config", None), "architecture", None) == BAICHUAN
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, NF4Linear)) or name == "lm_head":
            continue
        if baichuan and re.search(r"\.self_attn\.[qkv]_proj$", name):
            out.setdefault(name.rsplit(".", 1)[0] + ".W_pack", []).append(name)
        else:
            out[name] = [name]
    return out


def _is_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's `check_target_module_exists`: a string is a full-match regex; a list matches the name or a suffix."""
    if isinstance(targets, str):
        return targets.lower() == ALL_LINEAR or re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] | str = ("q_proj", "v_proj"), *, use_rslora: bool = False,
               rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
               dtype: torch.dtype | None = torch.float32, base_model_name_or_path: str | None = None) -> AdapterConfig:
    """Wrap the targeted linears in LoRA layers (fresh A, zero B) and freeze everything else.

    targets: module names (`q_proj`, `v_proj`, ..., Baichuan's `W_pack`), a full-match regex over module paths, or
    `all-linear` (every linear of the decoder blocks; never `lm_head`). Matching follows PEFT exactly.
    dtype: the adapters' dtype (float32 by default, as PEFT; None follows the base weight).
    Returns the config, also stored as `model.lora_config` for `save_adapter`.
    """
    if isinstance(targets, (list, tuple)) and [t.lower() for t in targets] == [ALL_LINEAR]:
        targets = ALL_LINEAR
    config = AdapterConfig(r=r, alpha=alpha, dropout=dropout,
                        targets=targets if isinstance(targets, str) else list(targets), use_rslora=use_rslora,
                        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                        base_model_name_or_path=base_model_name_or_path)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model already has LoRA layers (merge_and_unload first to apply another adapter)")
    candidates = _candidates(model)
    chosen = {peft: ours for peft, ours in candidates.items() if _is_target(peft, config.targets)}
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(f"LoRA targets {config.targets!r} match no module; linear modules are: {', '.join(names)}")
    for peft_name, ours in chosen.items():
        rank, a = config.rank_and_alpha(peft_name)
        bases = [model.get_submodule(n) for n in ours]
        wdtype = dtype or bases[0].weight.dtype
        if len(ours) == 1:
            _replace(model, ours[0], LoRALinear(bases[0], rank, a, dropout, use_rslora, wdtype))
            continue
        fused = LoRAAdapter(bases[0].in_features, sum(b.out_features for b in bases), rank, a, dropout, use_rslora,
                            device=_base_device(bases[0]), dtype=wdtype)
        _replace(model, peft_name, fused)
        model.get_submodule(peft_name.rpartition(".")[0]).__class__ = PackedAttention
        start = 0
        for n, base in zip(ours, bases):
            _replace(model, n, LoRASlice(base, fused, slice(start, start + base.out_features)))
            start += base.out_features
    if isinstance(config.targets, str) and config.targets.lower() == ALL_LINEAR:
        config.targets = sorted({n.rsplit(".", 1)[-1] for n in chosen})  # what PEFT writes for all-linear
    mark_only_lora_trainable(model)
    model.lora_config = config
    return config


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Swap in `module`, in the model's train/eval mode (a new dropout must not be active in an eval model)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module.train(model.training))


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad on lora_A / lora_B weights only."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRAWrapped]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRASlice)):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under our module paths (`model.layers.0.self_attn.q_proj.lora_A.weight`, or
    `...self_attn.W_pack.lora_A.weight` for Baichuan); PEFT's file keys are these with `base_model.model.` before."""
    return adapter_tensors(model.state_dict())


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def set_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy adapter tensors in (cast to the adapters' dtype); any missing, unexpected or mis-shaped key raises."""
    own = lora_state_dict(model)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or missing:
        raise ValueError(f"{source}: adapter keys do not match the model: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]} ({len(unexpected)} unexpected, {len(missing)} missing)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            params[k].copy_(v)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` computes as its base: every LoRA layer skips its update, so its dropout draws no
    random numbers either. `model` may be wrapped (DDP, FSDP, torch.compile). Merged adapters live in the weights and
    cannot be skipped: unmerge them first."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("model has no LoRA layers to disable")
    if any(layer.merged for layer in layers):
        raise ValueError("cannot disable merged LoRA adapters (they are in the base weights): unmerge_lora first")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


# ---- merging -----------------------------------------------------------------------------------------------------
def _merge(model: nn.Module, sign: int) -> None:
    for name, layer in lora_layers(model):
        if layer.merged == (sign > 0):
            continue
        base = layer.base_layer
        if isinstance(base, NF4Linear):
            raise ValueError(f"{name}: cannot merge into a 4-bit base (it would be requantized); load the base "
                             f"model in bf16/fp32, load the adapter, then merge")
        with torch.no_grad():
            base.weight.copy_(
                (base.weight.float() + sign * layer.adapter.delta_weight(layer.rows)).to(base.weight.dtype))
        layer.merged = sign > 0


def merge_lora(model: nn.Module) -> None:
    """W <- W + s * B @ A in every LoRA layer; forward then skips the adapter path (idempotent)."""
    _merge(model, +1)


def unmerge_lora(model: nn.Module) -> None:
    """W <- W - s * B @ A: back to the base weights (to rounding) with the adapters active again."""
    _merge(model, -1)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every LoRA layer by its base linear: a plain model that `save_model` writes."""
    merge_lora(model)
    for name, layer in list(lora_layers(model)):
        _replace(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if type(module) is LoRAAdapter:  # the shared W_pack adapters
            parent, _, child = name.rpartition(".")
            attention = model.get_submodule(parent)
            delattr(attention, child)
            attention.__class__ = Attention
    model.lora_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT adapter directories ------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT keys, metadata format=pt) atomically.
    `state` (e.g. gathered from FSDP shards) replaces the model's own tensors; its adapter keys are the ones kept."""
    config: AdapterConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no LoRA layers (apply_lora or load_adapter first)")
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    adapter = lora_state_dict(model) if state is None else adapter_tensors(state)
    state = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_json(tmp / ADAPTER_CONFIG, config.to_peft_dict())
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return path


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Parse a PEFT `adapter_config.json` (ours or PEFT's); unsupported settings raise naming the file and key."""
    file = Path(path) / ADAPTER_CONFIG
    d = read_json(file, "not found (not an adapter directory)")
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {d['peft_type']!r} is not supported (only LORA)")
    for key, accepted in _UNSUPPORTED.items():
        if key in d and d[key] not in accepted:
            raise ValueError(f"{file}: {key}={d[key]!r} is not supported (supported: {accepted[0]!r})")
    if "target_modules" not in d:
        raise ValueError(f"{file}: missing key 'target_modules'")
    targets = d["target_modules"]
    return AdapterConfig(r=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)),
                         dropout=float(d.get("lora_dropout") or 0),
                         targets=targets if isinstance(targets, str) else sorted(targets),
                         use_rslora=bool(d.get("use_rslora", False)), rank_pattern=d.get("rank_pattern") or {},
                         alpha_pattern=d.get("alpha_pattern") or {},
                         base_model_name_or_path=d.get("base_model_name_or_path"))


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a PEFT directory, keyed by our module paths (PEFT's prefix removed)."""
    file = Path(path) / ADAPTER_WEIGHTS
    state = {}
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            if not key.startswith(PEFT_PREFIX):
                raise ValueError(f"{file}: key {key!r} does not start with {PEFT_PREFIX!r}")
            state[key.removeprefix(PEFT_PREFIX)] = f.get_tensor(key)
    return state


def load_adapter(model: nn.Module, path: str | Path, dtype: torch.dtype | None = torch.float32,
                 trainable: bool = False) -> AdapterConfig:
    """Apply the adapter in a PEFT directory (written by us or by PEFT) to `model` and load its weights.

    Honours r, lora_alpha, use_rslora, rank_pattern, alpha_pattern and target_modules; a Baichuan `W_pack` adapter
    maps onto our split q/k/v exactly. trainable=False freezes the adapters too (inference).
    """
    path = Path(path)
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (adapter_model.bin is legacy pickle and is not read)")
    apply_lora(model, config.r, config.alpha, config.dropout, config.targets, use_rslora=config.use_rslora,
               rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern, dtype=dtype,
               base_model_name_or_path=config.base_model_name_or_path)
    set_lora_state_dict(model, read_adapter_weights(path), source=str(file))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model.lora_config
