"""The fused, chunked linear cross-entropy (model/loss.py) against autograd through F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

import model.loss as loss_mod
from model.loss import IGNORE_INDEX, linear_cross_entropy


def reference(hidden, weight, labels):
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / (
        (labels != IGNORE_INDEX).sum().clamp(min=1))


def grads_of(fn, hidden, weight, labels, upstream=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


@pytest.fixture
def data():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 37, 16, dtype=torch.float64), torch.randn(53, 16, dtype=torch.float64) * 0.5
    labels = torch.randint(0, 53, (3, 37))
    labels[0, :11] = IGNORE_INDEX
    labels[2, -5:] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 10_000])  # one row, uneven chunks, a single chunk
def test_loss_and_gradients_equal_autograd_in_float64(data, monkeypatch, rows_per_chunk):
    monkeypatch.setattr(loss_mod, "CHUNK_LOGITS", rows_per_chunk * 53)
    ours = grads_of(linear_cross_entropy, *data, upstream=2.5)
    ref = grads_of(reference, *data, upstream=2.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ours[1][0, :11].abs().max() == 0  # unlabelled rows get no gradient


def test_no_labelled_rows_give_zero_loss_and_zero_gradients(data):
    hidden, weight, labels = data
    loss, gh, gw = grads_of(linear_cross_entropy, hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_only_the_loss(data):
    hidden, weight, labels = data
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels).backward()  # weight frozen (a LoRA run's lm_head)
    torch.testing.assert_close(h.grad, grads_of(reference, *data)[1], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), reference(*data))


def test_bf16_autocast_matches_autograd_through_bf16_logits(data):
    """Under autocast the matmuls run in bf16 and the softmax in fp32, as the unfused path does."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads_of(linear_cross_entropy, hidden, weight, labels)
        ref = grads_of(lambda h, w, y: reference(h, w, y), hidden, weight, labels)
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):  # bf16 matmul outputs: agree to bf16 rounding
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
