"""The activation policy (trainer/activations.py): checkpointing, offloading and compiled blocks change what a step
keeps and where, never the gradients. On the CPU the offloader copies into separate host tensors with the same
bookkeeping as on a GPU."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.activations as activations
from model import ModelConfig, Transformer
from model.lora import apply_lora
from trainer.activations import ActivationPolicy, Offloader, apply_activation_policy

CONFIG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=160, max_position_embeddings=64)


def tiny_model() -> Transformer:
    """Two layers, seeded."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(**(CONFIG | {"num_hidden_layers": 2}))).eval()


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def lora_model(offload: bool, skip_last: int = 1, kept: int = 0, min_bytes: int = 0,
               dropout: float = 0.1, compile_blocks: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG))
    apply_lora(model, r=4, alpha=8, dropout=dropout, targets=["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh B is zero: make every adapter's gradient depend on the saved activations
            torch.nn.init.normal_(p, std=0.1)
    model._offloader = Offloader(min_bytes=min_bytes, prefetch_bytes=1 << 20)  # the test's handle on it
    apply_activation_policy(model, ActivationPolicy(checkpointing=True, offload=offload, keep_last=kept,
                                                    offload_skip_last=skip_last, compile_blocks=compile_blocks),
                            model._offloader)
    return model.train()


def step(model: Transformer, ids: torch.Tensor, count: bool = True, **inputs) -> tuple[list[torch.Tensor], int]:
    """LoRA gradients of one step (dropout seeded), and the matmuls its backward ran (eager models only: a compiled
    backward runs higher-order ops that the counter cannot see through)."""
    torch.manual_seed(1)
    loss = model(ids, ids, **inputs)
    counter = CountMatmuls()
    with counter if count else nullcontext():
        loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad], counter.mm


def test_offloaded_blocks_give_the_same_gradients():
    """3 of 4 blocks checkpointed, 2 of them offloaded (the last checkpointed one keeps its saved tensors on the
    device): the same LoRA gradients, bit for bit, as plain checkpointing, dropout included. Eager blocks recompute
    their MLP projections (the same matmuls as plain checkpointing): only compiled blocks save them."""
    ids = torch.randint(0, 97, (2, 24))
    plain = lora_model(offload=False, kept=1)
    offloaded = lora_model(offload=True, skip_last=1, kept=1)
    grads, mm = step(plain, ids)
    grads_off, mm_off = step(offloaded, ids)
    assert mm == mm_off
    assert offloaded._offloader.offloaded_bytes > 0
    for a, b in zip(grads, grads_off, strict=True):
        assert torch.equal(a, b)


def offloaded_shapes(model: Transformer, ids: torch.Tensor, **inputs) -> list[tuple[int, ...]]:
    """Shapes of the tensors one step offloads; none of them may be a parameter."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = []
    real_offload = model._offloader._offload
    model._offloader._offload = lambda t, nbytes: (seen.append(t), real_offload(t, nbytes))[1]
    step(model, ids, count=False, **inputs)
    assert not any(t.data_ptr() in params for t in seen)
    return [tuple(t.shape) for t in seen]


def test_eager_offloading_moves_the_block_inputs_above_the_floor():
    """With the 8 MiB default floor nothing of a tiny model moves; with none, each block's input, never a parameter
    or what every block shares (rotary tables, attention mask)."""
    ids = torch.randint(0, 97, (2, 24))
    floor = lora_model(offload=True, skip_last=0, min_bytes=8 << 20)
    step(floor, ids)
    assert floor._offloader.offloaded_bytes == 0
    shapes = offloaded_shapes(lora_model(offload=True, skip_last=0), ids)
    assert shapes == [(2, 24, CONFIG["hidden_size"])] * CONFIG["num_hidden_layers"]
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])  # packed rows: a mask that every block reads
    assert offloaded_shapes(lora_model(offload=True, skip_last=0), ids, segment_ids=segments) == shapes


def test_unpacking_reloads_ahead_within_the_prefetch_budget():
    """The backward asks for saved tensors newest first: taking one starts the reloads of those saved before it, up to
    prefetch_bytes, and frees its host copy."""
    offloader = Offloader(min_bytes=0, prefetch_bytes=2 * 4096)
    hooks = offloader.hooks(torch.nn.Linear(1, 1))
    tensors = [torch.full((1024,), float(i)) for i in range(5)]  # 4 KiB each
    packed = [hooks.pack_hook(t) for t in tensors]
    saved, _ = packed[0]
    assert offloader.offloaded_bytes == 5 * 4096
    back = hooks.unpack_hook(packed[4])
    assert torch.equal(back, tensors[4]) and back.data_ptr() != tensors[4].data_ptr()
    reloaded = [s.gpu is not None for s in saved]
    assert reloaded == [False, False, True, True, False]  # 3 and 2 in flight; 4 handed over
    assert saved[4].host is None
    for i in (3, 2, 1, 0):
        assert torch.equal(hooks.unpack_hook(packed[i]), tensors[i])
    assert all(s.host is None and s.gpu is None for s in saved)
    strided = torch.zeros(64, 32).t()
    assert hooks.pack_hook(strided) is strided  # would come back with other strides: stays where it is


def test_no_offloading_without_checkpointing_or_when_every_checkpointed_block_is_skipped():
    ids = torch.randint(0, 97, (2, 24))
    model = lora_model(offload=True, skip_last=3, kept=1)  # 3 checkpointed blocks, all skipped
    step(model, ids)
    assert model._offloader.offloaded_bytes == 0
    model = lora_model(offload=True)
    apply_activation_policy(model, ActivationPolicy())  # replaces the policy: no checkpointing, so no offloading
    model._offloader.offloaded_bytes = -1
    step(model, ids)
    assert model._offloader.offloaded_bytes == -1  # hooks never made
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # each layer runs as written


@pytest.mark.slow
def test_compiled_blocks_save_and_offload_the_mlp_projections():
    """Compiled blocks (one graph per block, what offloading needs): each offloaded block also moves its gate and up
    outputs (saved instead of recomputed), also once the sequence length is symbolic; the LoRA gradients are the eager
    model's to compiler rounding (no dropout: compiled dropout draws other masks), and so is evaluation, which runs the
    compiled blocks too (as DPO's no-grad reference pass does)."""
    ids = torch.randint(0, 97, (2, 24))
    eager = lora_model(offload=True, skip_last=1, dropout=0.0)
    compiled = lora_model(offload=True, skip_last=1, dropout=0.0, compile_blocks=True)
    grads, _ = step(eager, ids)
    torch._dynamo.reset()
    counters.clear()
    step(compiled, ids[:, :10], count=False)  # a second length makes the sequence dimension symbolic
    compiled.zero_grad(set_to_none=True)
    shapes = offloaded_shapes(compiled, ids)
    assert not counters["graph_break"]  # a break would run the checkpointed blocks eagerly, saving nothing
    assert shapes.count((ids.numel(), CONFIG["intermediate_size"])) == 2 * (CONFIG["num_hidden_layers"] - 1)
    grads_c = [p.grad for p in compiled.parameters() if p.requires_grad]
    for a, b in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(ids), eager.eval()(ids), rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """Every layer recomputed, the last one kept (no_recompute_last=1), or none recomputed: the same gradients."""
    ids = torch.randint(0, 97, (2, 12))
    checkpointed, real_checkpoint = [], activations.checkpoint

    def recording_checkpoint(fn, layer, *args, **kwargs):
        checkpointed.append(layer.self_attn.layer_idx)
        return real_checkpoint(fn, layer, *args, **kwargs)
    monkeypatch.setattr(activations, "checkpoint", recording_checkpoint)
    grads = []
    for ckpt, kept in ((False, 0), (True, 0), (True, 1)):
        model = tiny_model().train()
        apply_activation_policy(model, ActivationPolicy(checkpointing=ckpt, keep_last=kept))
        checkpointed.clear()
        model(ids, ids).backward()
        assert checkpointed == ([0, 1][:2 - kept] if ckpt else [])
        grads.append([p.grad for p in model.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)
    with torch.no_grad():  # evaluation runs each layer as written
        checkpointed.clear()
        model.eval()(ids)
        assert not checkpointed


@pytest.mark.slow
def test_whole_model_compiled_with_checkpointing_matches_eager():
    """torch.compile of the whole model (the trainer's --compile without offloading) traces the checkpointed blocks:
    eager's loss and gradients to compiler rounding."""
    ids = torch.randint(0, 97, (2, 12))
    eager, compiled = tiny_model().train(), tiny_model().train()
    for model in (eager, compiled):
        apply_activation_policy(model, ActivationPolicy(checkpointing=True, keep_last=1))
    loss = eager(ids, ids)
    loss.backward()
    loss_c = torch.compile(compiled)(ids, ids)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
