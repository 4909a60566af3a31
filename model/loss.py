"""Cross-entropy fused with the output projection, a chunk of tokens at a time, so the [tokens, vocab] logits are
never materialized whole (Liger-Kernel's fused linear cross-entropy, in plain PyTorch); and, the same way, each
labelled token's log-probability (DPO's sequence scores, `linear_log_probs`).

For hidden states h [N, d], the head W [V, d] and targets y (IGNORE_INDEX rows skipped), n labelled rows:

    z = h W^T  (in the compute dtype),   p = softmax(fp32(z)),   loss = sum_i (logsumexp(z_i) - z_i[y_i]) / n
    dloss/dz_i = (p_i - onehot(y_i)) / n   (0 for unlabelled rows),   dh = dz W,   dW = dz^T h

With a z-loss coefficient c (PaLM's auxiliary loss: it keeps each row's normalizer lse_i = logsumexp(z_i) near 0),
loss_i gains c lse_i^2 and dloss/dz_i = (p_i (1 + 2 c lse_i) - onehot(y_i)) / n.

With gradients wanted, the forward pass computes dh and dW chunk by chunk (each chunk's logits are freed before the
next is formed) and backward only scales them by the incoming gradient: the same matmuls as autograd would run, and
a peak of one chunk's logits instead of N x V in fp32 (4 GiB for a 32x1024 batch over a 32k vocabulary).

A chunk's softmax, loss and gradient: on a GPU with Triton, one kernel that writes the gradient over the logits
(model/loss_kernel.py; eager or compiled). Elsewhere, PyTorch ops that torch.compile fuses into one pass per chunk:
the one-hot is written over the target column afterwards, since a scatter into the fp32 probabilities makes
inductor write them out and read them back.

Per-token log-probabilities (log p_i = -loss_i) have a gradient dz_i = g_i (onehot(y_i) - p_i) whose row weights g_i
(from the DPO loss) exist only in the backward, so dh and dW cannot be formed ahead as above: the forward keeps no
logits, and the backward forms each chunk's logits again and runs the same softmax (kernel or PyTorch ops) with n = 1,
scaling its rows by -g_i. One more matmul than the mean loss, and still a peak of one chunk's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import loss_kernel

IGNORE_INDEX = -100
CHUNK_LOGITS = 2**27  # logits per chunk (512 MiB in fp32; 4096 rows of a 32k vocabulary): the fastest size
CHUNK_LOGITS_LOW_MEMORY = 2**25  # with gradient checkpointing memory comes first: a lower peak, barely slower


def chunk_rows(vocab: int, chunk_logits: int) -> int:
    """Rows per chunk: chunk_logits // vocab, rounded down to a multiple of 128 (whole GEMM tiles) when that large."""
    rows = max(1, chunk_logits // vocab)
    return rows // 128 * 128 if rows >= 128 else rows


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's when it is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


if loss_kernel.triton is not None and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("chatlm::softmax_cross_entropy_", mutates_args={"logits"})
    def _softmax_cross_entropy_cuda(logits: torch.Tensor, labels: torch.Tensor, n: torch.Tensor,
                                    write_grad: bool, z_loss: float = 0.0) -> torch.Tensor:
        """model/loss_kernel.py as an op torch.compile traces into its graph (and updates the logits in place)."""
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        loss_kernel.launch(torch.library.wrap_triton(loss_kernel.softmax_cross_entropy_kernel), logits, labels, n,
                           loss, IGNORE_INDEX, write_grad, z_loss)
        return loss
else:
    _softmax_cross_entropy_cuda = None


def uses_kernel(t: torch.Tensor) -> bool:
    """Whether chunks of `t` go through the Triton kernel: CUDA tensors, when Triton is installed."""
    return t.is_cuda and _softmax_cross_entropy_cuda is not None


def _softmax_cross_entropy_torch(logits: torch.Tensor, labels: torch.Tensor, n: torch.Tensor, write_grad: bool,
                                 z_loss: float = 0.0):
    """(per-row loss [rows] in fp32, 0 on unlabelled rows; gradient of the mean over n in the logits' dtype or None)
    of one chunk, in PyTorch ops: the path for CPUs, and for GPUs without Triton."""
    dtype, acc = logits.dtype, torch.promote_types(logits.dtype, torch.float32)
    # one kernel from the compute-dtype logits to fp32 log-probabilities: no fp32 copy of the logits and no
    # logsumexp temporaries (eager logsumexp is several full-size passes)
    logp = torch.log_softmax(logits, dim=-1, dtype=acc)
    lse = logits[:, 0].to(acc) - logp[:, 0] if z_loss else None  # z_j - log p_j, the same for every column j
    del logits  # the last reference (Python >= 3.11 moves call arguments into the callee): the chunk is freed here
    labelled = labels != IGNORE_INDEX
    target = labels.clamp(min=0)[:, None]
    picked = logp.gather(1, target)
    rows = -(picked.squeeze(1) * labelled)
    if z_loss:
        rows = rows + z_loss * lse.square() * labelled
    if not write_grad:
        return rows, None
    # p / n everywhere, then the target column overwritten with (p - 1) / n: the same values as subtracting the
    # one-hot in fp32, with the full-size pass left as one fused kernel under torch.compile (see above)
    scale = (labelled.to(acc) / n)[:, None]
    boost = 1 + 2 * z_loss * lse[:, None] if z_loss else 1
    grad = logp.exp_().mul_(scale * boost).to(dtype)
    del logp  # the fp32 chunk goes before the caller's matmuls (unless it is the same tensor as grad)
    grad.scatter_(1, target, (picked.exp() * boost - 1).mul_(scale).to(dtype))
    return rows, grad


def _chunk(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n: torch.Tensor, write_grad: bool,
           z_loss: float = 0.0):
    """(per-row loss, gradient of the mean over n over the logits or None) of the chunk h, its logits formed here."""
    if uses_kernel(h):
        logits = F.linear(h, weight)  # the kernel writes the gradient over the logits
        return _softmax_cross_entropy_cuda(logits, labels, n, write_grad, z_loss), logits if write_grad else None
    # the logits go in as a temporary, so the function can free them once it has their softmax
    return _softmax_cross_entropy_torch(F.linear(h, weight), labels, n, write_grad, z_loss)


def _loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n: torch.Tensor,
                    chunk_logits: int, want_hidden: bool, want_weight: bool, z_loss: float):
    """(summed loss, dloss/dhidden or None, dloss/dweight in fp32 or wider or None): gradients of the mean over n."""
    dtype = compute_dtype(weight)
    weight_c = weight.to(dtype)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    acc = torch.promote_types(dtype, torch.float32)  # softmax and dW accumulate in fp32 at least
    grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
    rows = chunk_rows(weight.shape[0], chunk_logits)
    total = hidden.new_zeros((), dtype=acc)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(dtype)
            chunk_loss, grad = _chunk(h, weight_c, labels[start:start + rows], n, want_hidden or want_weight, z_loss)
            total = total + chunk_loss.sum()
            if want_hidden:
                grad_hidden[start:start + rows] = grad @ weight_c
            if want_weight:
                grad_weight += (grad.T @ h).to(acc)
            del grad  # eager frees a chunk only when no name holds it: else it would live on beside the next one
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, n, chunk_logits, z_loss):
        total, grad_hidden, grad_weight = _loss_and_grads(hidden, weight, labels, n, chunk_logits,
                                                          *ctx.needs_input_grad[:2], z_loss)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_logits: int = CHUNK_LOGITS, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over labelled rows (0 when none is labelled; no
    host sync), plus `z_loss` x the mean squared logsumexp. hidden [..., d], weight [V, d], labels [...] with
    IGNORE_INDEX for rows to skip; about `chunk_logits` logits are formed at a time."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    n = (labels != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, n, chunk_logits, z_loss)
    return _loss_and_grads(hidden, weight, labels, n, chunk_logits, False, False, z_loss)[0] / n


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_logits):
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_logits = chunk_logits
        return _log_probs(hidden, weight, labels, chunk_logits)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        dtype = compute_dtype(weight)
        weight_c = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
        rows, one = chunk_rows(weight.shape[0], ctx.chunk_logits), hidden.new_ones((), dtype=torch.int64)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(dtype)
                _, grad = _chunk(h, weight_c, labels[start:start + rows], one, True)  # p - onehot, 0 unlabelled
                grad.mul_(-grad_out[start:start + rows, None].to(dtype))
                if want_hidden:
                    grad_hidden[start:start + rows] = grad @ weight_c
                if want_weight:
                    grad_weight += (grad.T @ h).to(acc)
                del grad
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_logits: int) -> torch.Tensor:
    dtype = compute_dtype(weight)
    weight_c, one = weight.to(dtype), hidden.new_ones((), dtype=torch.int64)
    rows = chunk_rows(weight.shape[0], chunk_logits)
    with torch.autocast(hidden.device.type, enabled=False):
        return -torch.cat([_chunk(hidden[start:start + rows].to(dtype), weight_c, labels[start:start + rows], one,
                                  False)[0] for start in range(0, hidden.shape[0], rows)])


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] of each row in fp32, labels.shape, 0 where the label is IGNORE_INDEX.
    hidden [..., d], weight [V, d]; about `chunk_logits` logits are formed at a time, in the forward and again in
    the backward (see the module docstring)."""
    shape = labels.shape
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLogProbs.apply(hidden, weight, labels, chunk_logits).view(shape)
    return _log_probs(hidden, weight, labels, chunk_logits).view(shape)
