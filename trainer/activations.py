"""What a training step keeps of its forward for the backward: activation checkpointing, activation offloading and
a compiled graph per decoder block, applied to a `Transformer` by the trainer (the model knows nothing of them).

`apply_activation_policy(model, ActivationPolicy(...))` replaces each decoder layer's `forward` on the instance (the
parameter names, and so checkpoints and adapters, do not change). In training (grad enabled, train mode) a layer then
runs as the policy says; in evaluation and generation it runs as written.

Offloading. With gradient checkpointing a block's backward first recomputes its forward (a third of a LoRA step's
FLOPs). A block may instead save part of its forward for the backward; here what it saves goes to pinned host memory
while the forward runs on, and comes back just before the block's backward:

- `save_mlp_projections` (a selective-checkpointing policy) keeps the outputs of the MLP's gate and up projections,
  57% of what a recomputed Llama block multiplies; at 7B and 4 x 1024 tokens, 172 MiB a block: too much for the
  GPU, fine for the host. The down projection is never recomputed.
- `Offloader` moves every saved tensor of a block (its input too) to pinned host memory on a copy stream as the block
  ends, and brings it back on a second stream when the backward asks for it, prefetching the tensors of the next
  blocks to be differentiated (`prefetch_bytes`).

The copies must hide behind compute. The last blocks' copies would still be running when the backward begins, so
the last `OFFLOAD_SKIP_LAST` recomputed blocks keep what they save on the GPU; their backward comes first. A block's
compute grows with width squared and its saved tensors with width: offloading pays from `PAYS_FROM_WIDTH` wide.

Stream order, per saved tensor t:
  forward:  the copy stream waits for the compute stream; t -> pinned host buffer; t.record_stream(copy stream), so
            the allocator reuses t's memory only once the copy is done.
  backward: the reload stream waits for t's copy; host -> GPU; the compute stream waits for the reload, and the
            reloaded tensor is recorded on the compute stream, which frees it.
On the CPU a saved tensor is copied into a separate host tensor, synchronously: the same bookkeeping, tested in CI.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.loss import CHUNK_LOGITS, CHUNK_LOGITS_LOW_MEMORY
from model.nf4 import NF4Linear, build_tables
from model.transformer import DecoderLayer, Transformer

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


# Plain checkpointing said op by op. A compiled block needs it said: left to its own choice, inductor keeps every
# block's dequantized NF4 weights alive (a QLoRA 7B step would hold the bf16 weights it quantized away).
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
        self.current: torch.autograd.graph.saved_tensors_hooks | None = None  # the hooks of the pass under way

    def begin(self, model: nn.Module, *shared: torch.Tensor | None) -> None:
        """Start a forward pass: its offloaded blocks run inside `current`, so they share one queue of reloads."""
        self.current = self.hooks(model, *shared)

    def hooks(self, model: nn.Module, *shared: torch.Tensor | None) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks for one forward pass of `model`. Its parameters and buffers, and the `shared` tensors that every
        block reads (the attention mask), are never copied: they stay alive on the GPU anyway."""
        shared = [t for s in shared for t in (s if isinstance(s, tuple) else (s,))]  # a Packed holds its tensor
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


# ---- the policy ----------------------------------------------------------------------------------------------------
OFFLOAD_SKIP_LAST = 4  # the last recomputed blocks keep what they save on the GPU: their backward comes first


@dataclass
class ActivationPolicy:
    checkpointing: bool = False  # recompute each block in the backward (less memory, a third more compute)
    offload: bool = False  # with checkpointing: what recomputed blocks save goes to pinned host memory
    compile_blocks: bool = False  # torch.compile each block call (one shared graph) and the final norm + loss
    keep_last: int = 0  # with checkpointing: the last N blocks keep their activations instead
    offload_skip_last: int | None = None  # with offload: the last N recomputed blocks keep theirs on the GPU
                                          # (None: OFFLOAD_SKIP_LAST)

    def __post_init__(self) -> None:
        if self.keep_last < 0 or (self.offload_skip_last or 0) < 0:
            raise ValueError(f"keep_last={self.keep_last}, offload_skip_last={self.offload_skip_last}: layer counts "
                             "must be >= 0")
        if self.offload and not self.checkpointing:
            raise ValueError("offloading moves what checkpointed layers save: it needs gradient checkpointing on "
                             "(--gradient-checkpointing)")


def compiles_per_block(model: nn.Module, offload: bool) -> bool:
    """--compile as a graph per decoder block rather than one for the whole model: when offloading (each block hands
    its saved tensors over as it ends) and for NF4 weights (a whole compiled QLoRA model keeps every dequantized
    weight alive; a block's explicit checkpoint policy does not)."""
    return offload or any(isinstance(m, NF4Linear) for m in model.modules())


def run_block(layer: DecoderLayer, x, cos, sin, mask, cache) -> torch.Tensor:
    """One decoder block as written, as a function of the layer: one compiled graph serves every block."""
    return DecoderLayer.forward(layer, x, cos, sin, mask, cache)


def run_checkpointed_block(layer: DecoderLayer, x, cos, sin, mask, cache, context_fn=None) -> torch.Tensor:
    """The block, recomputed in the backward; `context_fn` may choose tensors to save instead. None, not torch's
    no-op context_fn, when there is none: inside a whole-model graph dynamo cannot trace that one."""
    if context_fn is None:
        return checkpoint(run_block, layer, x, cos, sin, mask, cache, use_reentrant=False)
    return checkpoint(run_block, layer, x, cos, sin, mask, cache, use_reentrant=False, context_fn=context_fn)


@dataclass(frozen=True)
class _Plan:
    """How one layer runs in training."""
    model: Transformer
    index: int
    recompute: bool
    offloader: Offloader | None  # when this layer's saved tensors go to the host
    block: object  # run_block, or its compiled version
    checkpointed_block: object
    context_fn: object


def _policy_forward(layer: DecoderLayer, x, cos, sin, mask, cache, cache_position=None):
    """A layer's forward under its `_Plan` (installed as the layer's own `forward` method)."""
    plan: _Plan = layer.activation_plan
    if cache is not None or cache_position is not None:  # decoding
        return DecoderLayer.forward(layer, x, cos, sin, mask, cache, cache_position)
    if not (plan.recompute and layer.training and torch.is_grad_enabled()):  # also DPO's reference pass, eval
        return plan.block(layer, x, cos, sin, mask, cache)
    if plan.offloader is None:
        return plan.checkpointed_block(layer, x, cos, sin, mask, cache, plan.context_fn)
    if plan.index == 0:  # a new forward pass: the attention mask and rotary tables stay on the GPU
        plan.offloader.begin(plan.model, mask, cos, sin)
    with plan.offloader.current:
        return plan.checkpointed_block(layer, x, cos, sin, mask, cache, plan.context_fn)


def apply_activation_policy(model: Transformer, policy: ActivationPolicy,
                            offloader: Offloader | None = None) -> Offloader | None:
    """Make `model`'s training forward follow `policy` (replacing any policy applied before); returns the
    offloader when offloading (its `offloaded_bytes` says what the last forward moved)."""
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("activation_plan", None)
    model.__dict__.pop("norm_loss", None)
    model.loss_chunk_logits = CHUNK_LOGITS_LOW_MEMORY if policy.checkpointing else CHUNK_LOGITS
    if not (policy.checkpointing or policy.compile_blocks):
        return None
    block, checkpointed_block, context_fn = run_block, run_checkpointed_block, None
    offloader = (offloader or Offloader()) if policy.offload else None
    if policy.compile_blocks:
        build_tables(model)  # NF4 decoding tables, made outside the graphs
        block, checkpointed_block = torch.compile(run_block), torch.compile(run_checkpointed_block)
        model.norm_loss = types.MethodType(torch.compile(Transformer.norm_loss), model)
        # Saved MLP projections only in compiled blocks: there they are graph outputs that autograd saves through the
        # hooks; eager selective checkpointing caches them outside the hooks, on the device, so eager offloading moves
        # the block inputs alone. Compiled blocks always get an explicit policy.
        config = model.config
        context_fn = (save_mlp_projections(config.hidden_size, config.intermediate_size) if policy.offload
                      else recompute_all)
    layers = len(model.model.layers)
    kept_from = layers - policy.keep_last if policy.checkpointing else 0
    skip_last = OFFLOAD_SKIP_LAST if policy.offload_skip_last is None else policy.offload_skip_last
    offload_to = kept_from - skip_last if policy.offload else 0
    for i, layer in enumerate(model.model.layers):
        layer.activation_plan = _Plan(model, i, i < kept_from, offloader if i < offload_to else None, block,
                                      checkpointed_block, context_fn)
        layer.forward = types.MethodType(_policy_forward, layer)  # a deep copy of the model rebinds it to the copy
    return offloader
