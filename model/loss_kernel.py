"""One chunk of the fused cross-entropy on a GPU: the softmax, the loss and the logits' gradient in one Triton kernel.

For a row of logits z [V] with target y, over the n labelled rows of the whole batch (IGNORE_INDEX rows: 0):

    lse = log sum_j exp(z_j)        loss = lse - z_y + c lse^2
    dz_j = (exp(z_j - lse) (1 + 2 c lse) - [j = y]) / n

with c the z-loss coefficient (0: plain cross-entropy).

One program per row reads the row twice (an online max and sum of exponentials, then the gradient) and writes the
gradient over the logits in their dtype: no fp32 copy and no second buffer. The second pass starts from the last
block, the likeliest still in L2. It beats the same PyTorch ops compiled by inductor, eager or compiled
(bench/loss_kernel.py measures both).

Import-safe without Triton (`triton` stays None); model/loss.py calls it only for CUDA tensors.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: model/loss.py keeps to its PyTorch path
    triton = None

BLOCK = 4096  # logits per load: 4096-16 warps was the fastest of 8 configurations at 32k and 152k vocabularies
NUM_WARPS = 16

if triton is not None:
    @triton.jit
    def softmax_cross_entropy_kernel(logits_ptr, labels_ptr, n_ptr, loss_ptr, stride, z_loss, V: tl.constexpr,
                                     BLOCK: tl.constexpr, IGNORE_INDEX: tl.constexpr, WRITE_GRAD: tl.constexpr):
        """V is a compile-time constant: one kernel per vocabulary size, and loop bounds Triton's interpreter
        (the CPU tests) can run."""
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * stride
        label = tl.load(labels_ptr + row)
        labelled = label != IGNORE_INDEX
        target = tl.maximum(label, 0)
        cols = tl.arange(0, BLOCK)
        n_blocks: tl.constexpr = (V + BLOCK - 1) // BLOCK
        # per-lane running max and sum of exp(z - max); the max starts finite so lanes past V stay 0, not NaN
        lane_max = tl.full([BLOCK], -3.0e38, tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for b in range(n_blocks):
            c = b * BLOCK + cols
            z = tl.load(logits_ptr + c, mask=c < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, z)
            lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(z - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, 0)
        # lse = row_max + log_sum, kept apart: z - row_max is exact where z - lse would round at z's magnitude
        log_sum = tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))
        z_target = tl.load(logits_ptr + target).to(tl.float32)
        lse = row_max + log_sum
        tl.store(loss_ptr + row, tl.where(labelled, (row_max - z_target) + log_sum + z_loss * lse * lse, 0.0))
        if WRITE_GRAD:
            scale = tl.where(labelled, 1.0 / tl.load(n_ptr).to(tl.float32), 0.0)
            boost = 1.0 + 2.0 * z_loss * lse
            for b_back in range(n_blocks):
                c = (n_blocks - 1 - b_back) * BLOCK + cols
                z = tl.load(logits_ptr + c, mask=c < V).to(tl.float32)
                grad = (tl.exp((z - row_max) - log_sum) * boost - (c == target).to(tl.float32)) * scale
                tl.store(logits_ptr + c, grad.to(logits_ptr.dtype.element_ty), mask=c < V)


def launch(kernel, logits: torch.Tensor, labels: torch.Tensor, n: torch.Tensor, loss: torch.Tensor,
           ignore_index: int, write_grad: bool, z_loss: float = 0.0) -> None:
    """Run `kernel` (softmax_cross_entropy_kernel, or it wrapped for torch.compile) over the rows of `logits`
    [rows, V] (last dim contiguous): per-row losses into `loss` [rows] fp32 (0 where the label is `ignore_index`),
    and with `write_grad` the gradient of the mean over n (a 0-dim tensor) over the logits; `z_loss` the z-loss
    coefficient."""
    rows, vocab = logits.shape
    block = min(BLOCK, triton.next_power_of_2(vocab))
    kernel[(rows,)](logits, labels, n, loss, logits.stride(0), z_loss, V=vocab, BLOCK=block,
                    IGNORE_INDEX=ignore_index, WRITE_GRAD=write_grad, num_warps=max(1, min(NUM_WARPS, block // 256)))
