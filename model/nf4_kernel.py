"""NF4 dequantization as one Triton kernel: one launch per weight, the least host time eager QLoRA can spend on it.

For packed byte j (elements 2j and 2j+1, block b = j // 32, scale group g = b // 256):

    absmax_b = D[s_b] * c_g + offset                  (fp32, multiply then add: no fused multiply-add, as eager)
    W[2j]    = NF4[byte >> 4] * absmax_b,   W[2j + 1] = NF4[byte & 15] * absmax_b    (fp32, then cast)

Bit for bit the result of `model.nf4._decode_and_dequantize`. Eager QLoRA dequantizes each base weight three
times a step (forward, recomputation, backward), so the host's cost per weight counts: one launch costs the host
half of what a torch.compile'd call does, which keeps an eager QLoRA 7B step from waiting on the host.
Import-safe without Triton (`triton` stays None).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BYTES_PER_PROGRAM = 1024  # 2048 values a program; not tuned: at 7B shapes a launch takes longer than the kernel

if triton is not None:
    @triton.jit
    def nf4_dequantize_kernel(packed_ptr, scales_ptr, scale_absmax_ptr, offset_ptr, dynamic_ptr, code_ptr, out_ptr,
                              numel, BYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr, SCALE_BLOCK_SIZE: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        j = start + tl.arange(0, BYTES)
        in_range = 2 * j < numel
        byte = tl.load(packed_ptr + j, mask=in_range, other=0).to(tl.int32)
        block = j // (BLOCK_SIZE // 2)
        scale = tl.load(scales_ptr + block, mask=in_range, other=0).to(tl.int32)
        group_absmax = tl.load(scale_absmax_ptr + block // SCALE_BLOCK_SIZE, mask=in_range, other=0.0)
        absmax = tl.load(dynamic_ptr + scale) * group_absmax + tl.load(offset_ptr)
        high = tl.load(code_ptr + (byte >> 4)) * absmax
        low = tl.load(code_ptr + (byte & 15)) * absmax
        k = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + k, tl.interleave(high, low).to(out_ptr.dtype.element_ty), mask=k < numel)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, scale_absmax: torch.Tensor, offset: torch.Tensor,
               dynamic_code: torch.Tensor, nf4_code: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
               block_size: int, scale_block_size: int) -> torch.Tensor:
    """The weight of `shape` in `dtype` from its NF4 tensors (model/nf4.py's layout) and decoding tables."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(packed.numel(), BYTES_PER_PROGRAM),)
    nf4_dequantize_kernel[grid](packed, scales, scale_absmax, offset, dynamic_code, nf4_code, out, out.numel(),
                                BYTES=BYTES_PER_PROGRAM, BLOCK_SIZE=block_size, SCALE_BLOCK_SIZE=scale_block_size,
                                enable_fp_fusion=False)
    return out
