"""4-bit NormalFloat (NF4) weights with double quantization: the frozen base of QLoRA (Dettmers et al., 2023).

Storage follows bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`: its layout,
and the same 4-bit codes, offset and group scales bit for bit (tests/test_nf4.py, bitsandbytes 0.50):

    W (flattened, zero-padded to a multiple of 64) -> blocks W_b of 64 values
    absmax_b = max |W_b|
    q_i      = argmin_j |NF4[j] - W_i / absmax_b|           (4-bit index; ties go to the lower code, as bnb)
    packed   = q[0::2] << 4 | q[1::2]                        (two indices per uint8, first in the high nibble)

    double quantization of the fp32 block scales (blocks of 256, bnb's signed 8-bit dynamic map D):
    offset   = mean_b absmax_b
    c_g      = max |absmax_b - offset| over the 256 scales of group g
    s_b      = argmin_k |D[k] - (absmax_b - offset) * (1 / c_g)|   (uint8; ties go to the lower code)

    s_b is the exact nearest code, as bnb's pure-PyTorch backend computes it and its CUDA kernel's search finds it
    (tests/test_nf4.py, on a GPU: equal but within float rounding of a midpoint). bnb's native CPU kernel (0.50)
    does not search: it reads a 65,536-entry table over [-1, 1] (entry i: the code nearest -1 + 2i/65535) at
    round((x + 1) / 2 * 65535), so a value within half a step (1.5e-5) of a midpoint between two codes can get the
    farther code, as can a value with |x| < ~1e-4, where codes lie closer than a step: 57 of the 32,768 scales of a
    4096 x 512 Gaussian weight, each such block's absmax then off by up to 1.1% (5e-4). bnb dequantizes our tensors
    exactly as we do.

    dequantize: W_i ~= NF4[q_i] * (D[s_b] * c_g + offset)

Resident cost per parameter: 4 bits + 8/64 (uint8 scale) + 32/(64*256) (fp32 group scale) ~= 4.127 bits.

`NF4Linear` computes y = x W^T + b with W dequantized on the fly; its autograd Function saves only the packed data,
so backward dequantizes again (grad_x = grad_y W) and no bf16 copy of W lives across the step (torchao's
`linear_nf4` does the same). The base is frozen: no gradient ever flows to W.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4_kernel

BLOCK_SIZE = 64  # values per absmax scale
SCALE_BLOCK_SIZE = 256  # scales per double-quantization group

# bitsandbytes `get_4bit_type("nf4")`: norm.ppf quantiles, normalised to [-1, 1], with an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): 256 sorted values in [-1, 1].

    For exponent i in 0..6, 2^i fractions (midpoints of linspace(0.1, 1, 2^i + 1)) scaled by 10^(i-6), both signs,
    plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


def _nearest(values: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (a value exactly between two codes takes the lower one, as bnb)."""
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(values, midpoints.to(values.device), out_int32=True).to(torch.uint8)


def _blockwise(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a flat fp32 tensor to whole blocks; return the blocks [n, block] and their absmax [n]."""
    pad = -values.numel() % block
    blocks = F.pad(values, (0, pad)).view(-1, block)
    return blocks, blocks.abs().amax(dim=1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 indices < 16 (even count) -> bytes, first of each pair in the high nibble (bnb / torchao order)."""
    return q[0::2] << 4 | q[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 15), dim=-1).view(-1)


class NF4Weight:
    """A frozen weight held as NF4 with double-quantized scales. Holds only the packed tensors below."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, scale_absmax: torch.Tensor,
                 offset: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        self.packed = packed  # uint8 [ceil(numel/64) * 32]: two 4-bit NF4 indices per byte
        self.scales = scales  # uint8 [ceil(numel/64)]: block absmax, 8-bit dynamic code
        self.scale_absmax = scale_absmax  # fp32 [ceil(blocks/256)]: per-group absmax of (absmax - offset)
        self.offset = offset  # fp32 scalar: mean block absmax
        self.shape, self.dtype = torch.Size(shape), dtype

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor) -> "NF4Weight":
        """Quantize any float tensor; `dtype` remembers the original dtype (the default compute dtype)."""
        if not weight.is_floating_point():
            raise TypeError(f"NF4 quantization needs a float tensor, got {weight.dtype}")
        blocks, absmax = _blockwise(weight.detach().reshape(-1).float(), BLOCK_SIZE)
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
        packed = pack_nibbles(_nearest(scaled.view(-1), NF4_CODE))
        offset = absmax.mean()
        groups, group_absmax = _blockwise(absmax - offset, SCALE_BLOCK_SIZE)
        scales = _nearest((groups * (1.0 / group_absmax.clamp(min=1e-38))[:, None]).view(-1), DYNAMIC_CODE)
        return cls(packed, scales[: absmax.numel()].contiguous(), group_absmax, offset, weight.shape, weight.dtype)

    def block_absmax(self) -> torch.Tensor:
        """fp32 [blocks]: D[s_b] * c_g + offset."""
        return _block_absmax(self.scales, self.scale_absmax, self.offset, decoding_tables(self.scales.device)[0])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ~= NF4[q] * absmax_b, computed in fp32 (as bnb) and cast to `dtype` (default: the original dtype).

        Eagerly on CUDA one Triton kernel (model/nf4_kernel.py); elsewhere, and traced by torch.compile, one gather on
        a 256-entry table of byte -> (high-nibble code, low-nibble code) pairs and one multiply.
        """
        dynamic, code, pairs = decoding_tables(self.packed.device)
        if self.packed.is_cuda and nf4_kernel.triton is not None and not torch.compiler.is_compiling():
            return nf4_kernel.dequantize(*self.tensors(), dynamic, code, self.shape, dtype or self.dtype,
                                         BLOCK_SIZE, SCALE_BLOCK_SIZE)
        return _decode_and_dequantize(*self.tensors(), dynamic, pairs, self.shape, dtype or self.dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scales, self.scale_absmax, self.offset

    def nbytes(self) -> int:
        """Resident bytes of the quantized weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> "NF4Weight":
        return NF4Weight(*(t.to(device) for t in self.tensors()), self.shape, self.dtype)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def decoding_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DYNAMIC_CODE, NF4_CODE and the byte -> (high, low) code pairs on `device`, copied once: a CPU->GPU copy in
    every forward / backward would sync the host."""
    if device not in _TABLES:
        high, low = torch.meshgrid(NF4_CODE, NF4_CODE, indexing="ij")
        pairs = torch.stack((high, low), dim=-1).view(256, 2)
        _TABLES[device] = (DYNAMIC_CODE.to(device), NF4_CODE.to(device), pairs.to(device))
    return _TABLES[device]


def build_tables(model: nn.Module) -> None:
    """Make the decoding tables of every NF4 device in `model` now: built inside a compiled checkpointed block, the
    cache's first write is a side effect that breaks the block's graph."""
    for module in model.modules():
        if isinstance(module, NF4Linear):
            decoding_tables(module.weight_packed.device)


def _block_absmax(scales: torch.Tensor, scale_absmax: torch.Tensor, offset: torch.Tensor,
                  dynamic_table: torch.Tensor) -> torch.Tensor:
    n = scales.numel()
    groups = F.pad(dynamic_table[scales.int()], (0, -n % SCALE_BLOCK_SIZE)).view(-1, SCALE_BLOCK_SIZE)
    return (groups * scale_absmax[:, None]).view(-1)[:n] + offset


def _decode_and_dequantize(packed: torch.Tensor, scales: torch.Tensor, scale_absmax: torch.Tensor,
                           offset: torch.Tensor, dynamic_table: torch.Tensor, pair_table: torch.Tensor,
                           shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    absmax = _block_absmax(scales, scale_absmax, offset, dynamic_table)
    w = pair_table[packed.int()].view(-1, BLOCK_SIZE) * absmax[:, None]
    return w.view(-1)[: shape.numel()].view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward; only the 4-bit tensors are saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, *packed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*packed)
        ctx.shape, ctx.x_dtype = weight.shape, x.dtype
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        packed = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        weight = NF4Weight(*packed, ctx.shape, grad.dtype)
        grad_x = (grad @ weight.dequantize()).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, None) + (None,) * len(packed)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4: y = x dequant(W)^T + b (the bias stays in its float dtype).

    The packed tensors are buffers (they follow `.to(device)` and appear in `state_dict` under `weight_*` names);
    the compute dtype is the input's dtype, so under autocast the matmul runs in bf16.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        for name, t in zip(("packed", "scales", "scale_absmax", "offset"), weight.tensors()):
            self.register_buffer(f"weight_{name}", t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        return cls(NF4Weight.quantize(linear.weight), None if linear.bias is None else linear.bias.detach())

    @property
    def weight(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_scales, self.weight_scale_absmax, self.weight_offset,
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = _NF4Matmul.apply(x, w, *w.tensors())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


# Linear layers of a decoder block (never embed_tokens or lm_head, which QLoRA keeps in bf16).
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK_LINEAR_KEY = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")


def nf4_hook(targets: Iterable[str] = BLOCK_LINEARS) -> Callable[[nn.Module, str, torch.Tensor], bool]:
    """A `load_model(..., tensor_hook=...)` hook that quantizes the decoder-block linears named in `targets` as
    their weights are read, one tensor at a time, so the float weights of a 7B model are never all resident.

    The targeted module is replaced by an `NF4Linear`; a bias (Qwen2's q/k/v) read before or after its weight is
    carried over. Baichuan's W_pack arrives already split into q/k/v by `hf_to_ours`.
    """
    targets = set(targets)
    unknown = targets - set(BLOCK_LINEARS)
    if unknown:
        raise ValueError(f"nf4_hook: unknown targets {sorted(unknown)}; choose from {', '.join(BLOCK_LINEARS)}")

    def hook(model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
        m = _BLOCK_LINEAR_KEY.match(key)
        if not m or m.group(2) not in targets:
            return False
        module_name = key.rpartition(".")[0]
        parent_name, _, child = module_name.rpartition(".")
        parent, module = model.get_submodule(parent_name), model.get_submodule(module_name)
        if m.group(3) == "weight":
            bias = module.bias if module.bias is not None and module.bias.device.type != "meta" else None
            nf4 = NF4Linear(NF4Weight.quantize(tensor), bias)
            if module.bias is not None and bias is None:  # bias not read yet: keep a placeholder until it is
                nf4.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"), requires_grad=False)
            setattr(parent, child, nf4)
            return True
        if isinstance(module, NF4Linear):
            module.bias = nn.Parameter(tensor, requires_grad=False)
            return True
        return False  # bias before weight: load_model assigns it to the nn.Linear; the weight carries it over

    return hook
