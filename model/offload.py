"""Activation offloading: checkpointed decoder blocks keep more of their forward, in pinned host memory.

With gradient checkpointing, a block's backward first recomputes its forward: on a 7B LoRA step that is a third of
the FLOPs. A block may instead save some of its forward for the backward, at GPU memory cost; here what it saves goes
to host memory while the forward runs on, and comes back just before the block's backward:

- `save_mlp_projections` (a selective-checkpointing policy) keeps the outputs of the MLP's gate and up projections,
  57% of what a recomputed Llama block multiplies (2 x 4096 x 11008 of 4 x 4096^2 + 2 x 4096 x 11008 per token; the
  down projection is never recomputed, see bench/RESULTS.md session 4). At 7B and 4 x 1024 tokens that is 172 MiB a
  block, 5.4 GiB for 32 blocks: too much for the GPU, fine for the host.
- `Offloader` moves every saved tensor of a block (its input too) to pinned host memory on a copy stream as the block
  ends, and brings it back on a second stream when the backward asks for it, prefetching the tensors of the next
  blocks to be differentiated (`prefetch_bytes`).

The copies must hide behind compute: a 7B block's forward takes ~2.5 ms on an H200, in which 55 GB/s move ~140 MB;
what a block saves (204 MiB) is more, so the copies of the last blocks are still running when the backward begins.
The model therefore keeps the last `offload_skip_last` checkpointed blocks' saved tensors on the GPU
(`Transformer.offload_skip_last`); their backward comes first. Measured in bench/RESULTS.md (run 31). A block's
compute grows with width squared and its saved tensors with width, so narrow models lose: the 768-wide `small`
preset trained at 0.58x with offloading on an H100 (run 34); hence `PAYS_FROM_WIDTH`.

Stream order, per saved tensor t:
  forward:  the copy stream waits for the compute stream; t -> pinned host buffer; t.record_stream(copy stream), so
            the allocator reuses t's memory only once the copy is done.
  backward: the reload stream waits for t's copy; host -> GPU; the compute stream waits for the reload, and the
            reloaded tensor is recorded on the compute stream, which frees it.
On the CPU a saved tensor is copied into a separate host tensor, synchronously: the same bookkeeping, tested in CI.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

PAYS_FROM_WIDTH = 4096  # narrower blocks compute for less time than their saved tensors take to copy (below)
MIN_OFFLOAD_BYTES = 8 << 20  # smaller saved tensors (rotary tables, norms' statistics, RNG states) stay put
PREFETCH_BYTES = 256 << 20  # reloads kept in flight ahead of the backward: ~1 block of a 7B model at 4 x 1024


def save_mlp_projections(hidden_size: int, intermediate_size: int):
    """A `context_fn` for `torch.utils.checkpoint`: save the outputs of the matmuls from the hidden width to the
    intermediate width (the MLP's gate and up projections; a LoRA B product has rank width in, so it is not one of
    them), recompute everything else."""
    mm = torch.ops.aten.mm.default

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op is mm and args[0].shape[-1] == hidden_size and args[1].shape[-1] == intermediate_size:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return functools.partial(create_selective_checkpoint_contexts, policy)


def _recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


# Plain checkpointing said op by op. A compiled block needs it said: left to its own choice, inductor kept every
# block's dequantized NF4 weights alive (QLoRA on the 7B shape: a 25.7 GiB peak instead of 5.7; bench/RESULTS.md run 35).
# Its own function, not a save_mlp_projections that saves nothing: dynamo keys compiled code by the policy's code.
recompute_all = functools.partial(create_selective_checkpoint_contexts, _recompute)


@dataclass
class _Saved:
    """One offloaded tensor: its host copy, the event that ends the copy, and once reloaded its GPU copy."""
    host: torch.Tensor | None
    device: torch.device
    nbytes: int
    copied: torch.cuda.Event | None = None
    gpu: torch.Tensor | None = None
    reloaded: torch.cuda.Event | None = None


class Offloader:
    """Makes the `saved_tensors_hooks` of one forward pass: `with offloader.hooks(model): ...`. Moves contiguous
    tensors of at least `min_bytes` that are not the model's parameters or buffers."""

    def __init__(self, min_bytes: int | None = None, prefetch_bytes: int = PREFETCH_BYTES):
        self.min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
        self.prefetch_bytes = prefetch_bytes
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self.offloaded_bytes = 0  # by the last forward pass: the host memory it holds until its backward

    def hooks(self, model: nn.Module, *shared: torch.Tensor | None) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks for one forward pass of `model`. Its parameters and buffers, and the `shared` tensors that every
        block reads (the attention mask), are never copied: they stay alive on the GPU anyway."""
        resident = {t.data_ptr() for t in (*model.parameters(), *model.buffers(), *shared) if t is not None}
        step: list[_Saved] = []  # this pass's tensors in the order saved (the backward asks for them in reverse)
        self.offloaded_bytes = 0

        def pack(t: torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if nbytes < self.min_bytes or t.data_ptr() in resident or not t.is_contiguous():
                return t  # a strided view would come back contiguous, against a compiled backward's strides
            step.append(self._offload(t, nbytes))
            self.offloaded_bytes += nbytes
            return step, len(step) - 1

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            owner, index = packed
            return self._take(owner, index)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _copy_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _offload(self, t: torch.Tensor, nbytes: int) -> _Saved:
        if t.device.type != "cuda":
            return _Saved(t.detach().clone(), t.device, nbytes)
        d2h, _ = self._copy_streams(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        d2h.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(d2h):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(d2h)
        t.record_stream(d2h)
        return _Saved(host, t.device, nbytes, copied)

    def _reload(self, s: _Saved) -> None:
        if s.gpu is not None or s.host is None:
            return
        if s.device.type != "cuda":
            s.gpu = s.host.clone()
            return
        _, h2d = self._copy_streams(s.device)
        with torch.cuda.stream(h2d):
            h2d.wait_event(s.copied)
            s.gpu = s.host.to(s.device, non_blocking=True)
            s.reloaded = torch.cuda.Event()
            s.reloaded.record(h2d)

    def _take(self, step: list[_Saved], index: int) -> torch.Tensor:
        """The saved tensor `index` back on its device; reloads of the ones saved before it (next in the backward)
        start now, up to `prefetch_bytes`."""
        s = step[index]
        self._reload(s)
        budget, j = self.prefetch_bytes, index - 1
        while j >= 0 and budget > 0:
            self._reload(step[j])
            budget -= step[j].nbytes
            j -= 1
        t, s.gpu, s.host = s.gpu, None, None
        if s.reloaded is not None:
            compute = torch.cuda.current_stream(s.device)
            compute.wait_event(s.reloaded)
            t.record_stream(compute)
        return t
