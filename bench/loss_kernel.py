"""One chunk of the fused loss on a GPU: model/loss_kernel.py against the same chunk in PyTorch ops, eager and
compiled by inductor, in one process.

    python bench/loss_kernel.py

For each vocabulary (Llama's 32000, Qwen's 151936) a chunk of the rows model/loss.py forms at once, bf16 logits
(random, never zero), a seventh of the rows unlabelled: the median of 50 CUDA-event timings after 3 warm-up runs, the
bytes a minimal pass moves (read the logits, write the gradient) over that time, and how far each side's bf16
gradient lies from a float64 one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nf4 import timed  # noqa: E402

from model.loss import CHUNK_LOGITS, IGNORE_INDEX, _softmax_cross_entropy_cuda, _softmax_cross_entropy_torch, chunk_rows  # noqa: E402,E501


def measure(vocab: int, compiled) -> None:
    """The table's rows for one vocabulary."""
    rows = chunk_rows(vocab, CHUNK_LOGITS)
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda") * 2).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = IGNORE_INDEX
    n = (labels != IGNORE_INDEX).sum()
    truth = torch.softmax(logits.double(), -1)
    truth[torch.arange(rows), labels.clamp(min=0)] -= 1
    truth *= ((labels != IGNORE_INDEX).double() / n)[:, None]
    scratch = logits.clone()

    def ours():
        return _softmax_cross_entropy_cuda(scratch, labels, n, True)

    def ours_gradient():
        scratch.copy_(logits)
        ours()
        return scratch

    sides = {  # side: (one run, the gradient it gives for `logits`)
        "PyTorch eager": (lambda: _softmax_cross_entropy_torch(logits, labels, n, True),
                          lambda: _softmax_cross_entropy_torch(logits, labels, n, True)[1]),
        "PyTorch compiled": (lambda: compiled(logits, labels, n, True), lambda: compiled(logits, labels, n, True)[1]),
        "ours (Triton)": (ours, ours_gradient),  # timed on its own output again and again: the same bytes and work
    }
    gbytes = 2 * logits.numel() * logits.element_size() / 1e9
    eager_ms = None
    for side, (run, gradient) in sides.items():
        ms = timed(run, 50)
        eager_ms = eager_ms or ms
        error = ((gradient().double() - truth).norm() / truth.norm()).item()
        print(f"| {vocab} | {rows} | {side} | {ms:.3f} | {gbytes / ms:.2f} | {eager_ms / ms:.2f}x | {error:.2e} |")


def main() -> None:
    compiled = torch.compile(_softmax_cross_entropy_torch, dynamic=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| vocab | rows | side | ms | TB/s | vs eager | gradient error vs float64 |")
    print("|---|---|---|---|---|---|---|")
    for vocab in (32000, 151936):
        measure(vocab, compiled)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
