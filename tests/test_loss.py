"""The fused, chunked linear cross-entropy and per-token log-probabilities (model/loss.py) against autograd through
F.cross_entropy / log_softmax on full logits."""
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SLOW_TIMEOUT

import model.loss
import model.loss_kernel
import model.transformer
from model import ModelConfig, Transformer
from model.loss import CHUNK_LOGITS, CHUNK_LOGITS_LOW_MEMORY, IGNORE_INDEX, linear_cross_entropy, linear_log_probs
from trainer.activations import ActivationPolicy, apply_activation_policy


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
def test_loss_and_gradients_equal_autograd_in_float64(data, rows_per_chunk):
    ours = grads_of(partial(linear_cross_entropy, chunk_logits=rows_per_chunk * 53), *data, upstream=2.5)
    ref = grads_of(reference, *data, upstream=2.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ours[1][0, :11].abs().max() == 0  # unlabelled rows get no gradient


def z_loss_reference(hidden, weight, labels, c):
    """Cross-entropy plus c x the mean over labelled rows of logsumexp(logits)^2, through autograd."""
    logits = (hidden @ weight.T).flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labelled = labels.flatten() != IGNORE_INDEX
    return reference(hidden, weight, labels) + c * (logits.logsumexp(-1).square() * labelled).sum() / labelled.sum()


@pytest.mark.parametrize("rows_per_chunk", [7, 10_000])
def test_z_loss_and_its_gradients_equal_autograd_in_float64(data, rows_per_chunk):
    hidden, weight, labels = data
    c = 0.05  # large, so that the term moves the loss and every gradient well past the tolerance
    ours = grads_of(partial(linear_cross_entropy, chunk_logits=rows_per_chunk * 53, z_loss=c), *data, upstream=2.5)
    for a, b in zip(ours, grads_of(partial(z_loss_reference, c=c), *data, upstream=2.5)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, grads_of(reference, *data, upstream=2.5)):
        assert (a - b).abs().max() > 1e-3
    with torch.no_grad():  # the loss alone takes the same path
        torch.testing.assert_close(linear_cross_entropy(*data, z_loss=c), ours[0], rtol=1e-12, atol=1e-12)


def test_the_model_adds_its_z_loss_in_training_only():
    """Transformer.z_loss (set by pretrain from --z-loss) is a training term: evaluation measures cross-entropy."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("tiny"))
    ids = torch.randint(0, net.config.vocab_size, (2, 9))
    with torch.no_grad():
        plain = net.train()(ids, ids)
        net.z_loss = 1e-2
        lse = net.eval()(ids).logsumexp(-1)
        assert net(ids, ids) == plain
        torch.testing.assert_close(net.train()(ids, ids), plain + 1e-2 * lse.square().mean(), rtol=1e-5, atol=1e-6)


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


def test_confident_predictions_keep_their_small_gradient_in_bf16():
    """p_target near 1: dz_target = p - 1 is small, so it must be formed in fp32 before the cast to bf16
    (bf16(p) - 1 would be 0 or -2^-8, off by several times its size)."""
    torch.manual_seed(1)
    weight = torch.randn(64, 32) * 0.3
    labels = torch.randint(0, 64, (1, 40))
    hidden = weight[labels[0]][None] * 4.0  # the target's logit stands far above the others
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden.bfloat16(), weight.bfloat16()).double()
        p_target = logits.softmax(-1).gather(-1, labels[..., None])
        assert p_target.median() > 0.99 and (p_target < 0.9999).sum() > 10
        _, gh, gw = grads_of(linear_cross_entropy, hidden, weight, labels)
    dz = (logits.softmax(-1) - F.one_hot(labels, 64)) / labels.numel()  # float64 from the same bf16 logits
    torch.testing.assert_close(gh.double(), dz @ weight.bfloat16().double(), rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(gw.double(), dz.flatten(0, 1).T @ hidden.bfloat16().double().flatten(0, 1),
                               rtol=2e-2, atol=1e-5)


def log_probs_reference(hidden, weight, labels):
    logits = hidden @ weight.T
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != IGNORE_INDEX)


def log_prob_grads(fn, hidden, weight, labels, upstream):
    """(per-token log-probs, dh, dW) of sum(upstream x log-probs): row weights that only the backward knows."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fn(h, w, labels)
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 10_000])
def test_log_probs_and_their_gradients_equal_autograd_in_float64(data, rows_per_chunk):
    """DPO's per-token log-probabilities: the values, and dh, dW under per-row upstream gradients, chunk by chunk;
    unlabelled rows give 0 and get no gradient (the prompt contributes nothing)."""
    upstream = torch.randn(data[2].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = log_prob_grads(partial(linear_log_probs, chunk_logits=rows_per_chunk * 53), *data, upstream)
    for a, b in zip(ours, log_prob_grads(log_probs_reference, *data, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ours[0].shape == data[2].shape and ours[0][0, :11].abs().max() == 0 and ours[1][0, :11].abs().max() == 0
    hidden, weight, labels = data
    h = hidden.clone().requires_grad_()
    (linear_log_probs(h, weight, labels) * upstream).sum().backward()  # a frozen head (LoRA): dh only
    torch.testing.assert_close(h.grad, ours[1], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_log_probs(hidden, weight, labels), ours[0], rtol=1e-12, atol=1e-12)


def test_log_probs_under_bf16_autocast_match_autograd_through_bf16_logits(data):
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in data)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = log_prob_grads(linear_log_probs, hidden, weight, labels, upstream)
        ref = log_prob_grads(log_probs_reference, hidden, weight, labels, upstream)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1:], ref[1:]):  # bf16 products of order 1 (not / n): compared as a whole
        assert ((a - b).norm() / b.norm()).item() < 5e-3


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_eager_holds_one_chunk_at_a_time(data, monkeypatch, grad_enabled):
    """When a chunk's logits are formed, the previous chunk's fp32 log-probabilities and its gradient are freed
    (eager keeps whatever a Python name still holds: two chunks at once would double the loss's peak)."""
    import weakref
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in data)
    earlier: list[weakref.ref] = []
    log_softmax, scatter_ = torch.log_softmax, torch.Tensor.scatter_

    def spy_log_softmax(*args, **kwargs):
        assert all(r() is None for r in earlier), "a previous chunk is still alive"
        out = log_softmax(*args, **kwargs)
        earlier.append(weakref.ref(out))
        return out

    def spy_scatter_(self, *args, **kwargs):
        earlier.append(weakref.ref(self))
        return scatter_(self, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", spy_log_softmax)
    monkeypatch.setattr(torch.Tensor, "scatter_", spy_scatter_)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad_enabled):
        loss = linear_cross_entropy(hidden.requires_grad_(grad_enabled), weight, labels, chunk_logits=10 * 53)
    assert len(earlier) == (24 if grad_enabled else 12)  # 111 rows in 12 chunks: each chunk's logp (and grad)
    torch.testing.assert_close(loss.float(), reference(hidden.detach(), weight, labels), rtol=1e-2, atol=1e-2)


def test_gradient_checkpointing_asks_for_smaller_chunks(monkeypatch):
    """Checkpointing is asked for to save memory, so the loss's transient logits shrink with it."""
    asked = []
    monkeypatch.setattr(model.transformer, "linear_cross_entropy",
                        lambda *args: asked.append(args[3]) or linear_cross_entropy(*args))
    net = Transformer(ModelConfig.preset("tiny")).train()
    ids = torch.randint(0, net.config.vocab_size, (2, 9))
    for checkpointing in (False, True):
        apply_activation_policy(net, ActivationPolicy(checkpointing=checkpointing))
        net(ids, ids).backward()
    assert asked == [CHUNK_LOGITS, CHUNK_LOGITS_LOW_MEMORY] and CHUNK_LOGITS_LOW_MEMORY < CHUNK_LOGITS


@pytest.fixture(scope="module")
def interpreted(triton_interpreter):
    """model/loss_kernel.py, whose GPU kernel runs on CPU tensors in Triton's interpreter (conftest.py turns it on
    on machines without CUDA; test_cuda_kernel_equals_the_torch_path runs on those with it)."""
    return model.loss_kernel


def run_kernel(module, logits, labels, n, write_grad=True, z_loss=0.0):
    """The kernel's (per-row losses, logits afterwards) for a copy of `logits`."""
    logits, loss = logits.clone(), torch.empty(len(logits))
    module.launch(module.softmax_cross_entropy_kernel, logits, labels, n, loss, IGNORE_INDEX, write_grad, z_loss)
    return loss, logits


def chunk(rows, vocab, dtype=torch.float32, scale=4.0):
    torch.manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab) * scale).to(dtype)
    logits[1] += 1e4  # a large offset: the running max keeps exp() in range
    labels = torch.randint(0, vocab, (rows,))
    labels[2::5] = IGNORE_INDEX
    return logits, labels, (labels != IGNORE_INDEX).sum()


@pytest.mark.parametrize("vocab,block", [(53, 4096), (1000, 4096), (1000, 64), (300, 256)])
def test_kernel_equals_the_torch_path(interpreted, monkeypatch, vocab, block):
    """One block per row, several blocks with a partial last one (1000 = 15 x 64 + 40), a row shorter than the
    block; rows with no label get 0 loss and 0 gradient."""
    monkeypatch.setattr(interpreted, "BLOCK", block)
    logits, labels, n = chunk(12, vocab)
    loss, grad = run_kernel(interpreted, logits, labels, n)
    ref_rows, ref_grad = model.loss._softmax_cross_entropy_torch(logits.clone(), labels, n, True)
    torch.testing.assert_close(loss, ref_rows, rtol=1e-6, atol=2e-3)  # fp32 spacing at row 1's 1e4: 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert loss[2::5].abs().max() == 0 and grad[2::5].abs().max() == 0
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.sum(-1).abs().max() < 1e-6  # softmax minus one-hot: each row's gradient sums to 0


def test_kernel_with_z_loss_equals_the_torch_path(interpreted):
    logits, labels, n = chunk(12, 1000, scale=1.0)
    loss, grad = run_kernel(interpreted, logits, labels, n, z_loss=1e-2)
    ref_rows, ref_grad = model.loss._softmax_cross_entropy_torch(logits.clone(), labels, n, True, 1e-2)
    plain_rows, _ = model.loss._softmax_cross_entropy_torch(logits.clone(), labels, n, True)
    assert (ref_rows - plain_rows)[1] > 1e5  # row 1's normalizer is 1e4: z-loss 1e-2 x 1e8
    torch.testing.assert_close(loss, ref_rows, rtol=1e-6, atol=2e-3)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_kernel_without_gradient_leaves_the_logits(interpreted):
    logits, labels, n = chunk(8, 700)
    loss, after = run_kernel(interpreted, logits, labels, n, write_grad=False)
    assert torch.equal(after, logits)
    torch.testing.assert_close(loss, model.loss._softmax_cross_entropy_torch(logits, labels, n, False)[0])


def test_kernel_in_bf16_matches_to_bf16_rounding(interpreted):
    """The gradient is stored in the logits' dtype. (The interpreter truncates to bf16 where a GPU rounds to
    nearest, hence one bf16 step of tolerance.)"""
    logits, labels, n = chunk(8, 3000, torch.bfloat16)
    loss, grad = run_kernel(interpreted, logits, labels, n)
    ref_rows, ref_grad = model.loss._softmax_cross_entropy_torch(logits.clone(), labels, n, True)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_rows, rtol=1e-6, atol=2e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-7, atol=1e-9)


def test_linear_cross_entropy_through_the_kernel_equals_autograd(interpreted, monkeypatch, data):
    """The chunk loop with the kernel's op (as CUDA tensors take it, here interpreted on the CPU): the gradient
    written over each chunk's logits feeds dh and dW; without gradients only the loss is formed."""
    launches, launch = [], interpreted.launch
    monkeypatch.setattr(model.loss, "uses_kernel", lambda t: True)
    monkeypatch.setattr(interpreted, "launch", lambda *args: launches.append(args[6]) or launch(*args))
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in data)
    ours = grads_of(partial(linear_cross_entropy, chunk_logits=10 * 53), hidden, weight, labels, upstream=2.5)
    assert launches == [True] * 12  # 111 rows in chunks of 10
    ref = grads_of(reference, hidden, weight, labels, upstream=2.5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), ref[0], rtol=1e-5, atol=1e-6)
    assert launches[12:] == [False]  # one chunk, loss only


def test_log_probs_through_the_kernel_equal_autograd(interpreted, monkeypatch, data):
    """Per-token log-probabilities with the kernel's op: the forward reads each chunk once (no gradient written),
    the backward forms each chunk's logits again and has the kernel write p - onehot over them."""
    launches, launch = [], interpreted.launch
    monkeypatch.setattr(model.loss, "uses_kernel", lambda t: True)
    monkeypatch.setattr(interpreted, "launch", lambda *args: launches.append(args[6]) or launch(*args))
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in data)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    ours = log_prob_grads(partial(linear_log_probs, chunk_logits=10 * 53), hidden, weight, labels, upstream)
    assert launches == [False] * 12 + [True] * 12
    for a, b in zip(ours, log_prob_grads(log_probs_reference, hidden, weight, labels, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or model.loss._softmax_cross_entropy_cuda is None,
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_kernel_equals_the_torch_path(monkeypatch, compiled):
    """On a GPU, eager and compiled (dynamic shapes, as SFT batches vary): the loss, dh and dW in bf16 autocast
    agree with the PyTorch ops to bf16 rounding."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 700, 256, device="cuda")
    weight = torch.randn(32000, 256, device="cuda") * 0.05
    labels = torch.randint(0, 32000, (2, 700), device="cuda")
    labels[:, :100] = IGNORE_INDEX
    fn = partial(linear_cross_entropy, chunk_logits=256 * 32000)
    if compiled:
        fn = torch.compile(fn, dynamic=True, fullgraph=True)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(model.loss, "uses_kernel", lambda t, k=kernel: k)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(grads_of(fn, hidden, weight, labels))
        torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-6)
        assert ((a - b).norm() / b.norm()).item() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available() or model.loss._softmax_cross_entropy_cuda is None,
                    reason="needs a CUDA GPU and Triton")
def test_cuda_whole_model_gradients_are_as_close_to_float64_with_the_kernel(monkeypatch):
    """One bf16-autocast step of the `small` shape: every weight's gradient lies as close to a float64 step's with
    the kernel as with the PyTorch ops. The two bf16 paths differ from each other by more than a chunk does (run 38:
    0.01% at the last layer, 0.6-0.9% at the first and the tied embedding), as two runs of the PyTorch ops do
    (0.2-0.5%, nondeterministic backward kernels): rounding noise that grows through the backward, not a bias."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.preset("small", vocab_size=32000, max_position_embeddings=512)).cuda()
    net64 = Transformer(net.config).cuda().double()
    net64.load_state_dict(net.state_dict())
    ids = torch.randint(0, 32000, (2, 513), device="cuda")

    def gradients(module, kernel, autocast=True):
        monkeypatch.setattr(model.loss, "uses_kernel", lambda t: kernel)
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            module(ids[:, :-1], ids[:, 1:]).backward()
        return {name: p.grad.double() for name, p in module.named_parameters()}

    exact = gradients(net64, kernel=False, autocast=False)
    errors = {}
    for kernel in (True, False):
        g = gradients(net, kernel)
        errors[kernel] = {name: ((g[name] - exact[name]).norm() / exact[name].norm()).item() for name in exact}
    assert max(errors[False].values()) < 0.05  # bf16 autocast's own error: ~1.5%
    worse = {name: (errors[True][name], errors[False][name]) for name in exact
             if errors[True][name] > 1.05 * errors[False][name] + 1e-5}
    assert not worse, f"gradients further from float64 with the kernel (kernel, torch): {worse}"


FSDP_SCRIPT = '''
import copy, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from model import ModelConfig, Transformer
from model.lora import apply_lora
from model.nf4 import NF4Linear
from trainer.activations import ActivationPolicy, apply_activation_policy
dist.init_process_group("gloo")
torch.manual_seed(0)
lora = sys.argv[1] in ("lora", "qlora")
cfg = ModelConfig.preset("tiny", tie_word_embeddings=True)
whole = Transformer(cfg)
if sys.argv[1] == "qlora":  # NF4 block linears: frozen uint8 buffers, which FSDP moves but does not shard
    for layer in whole.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, NF4Linear.from_linear(child))
if lora:  # adapters with nonzero B on q, v
    apply_lora(whole, r=4, alpha=8, targets=["q_proj", "v_proj"])
    for name, p in whole.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
sharded = copy.deepcopy(whole)
apply_activation_policy(sharded, ActivationPolicy(checkpointing=lora))  # the sharded model recomputes its layers
ids = torch.randint(0, cfg.vocab_size, (4, 33))
whole(ids[:, :-1], ids[:, 1:]).backward()
mesh = init_device_mesh("cpu", (2,))  # by default a machine with a GPU would shard onto cuda:rank
for layer in sharded.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(sharded, mesh=mesh)  # the root holds the tied embedding / lm_head, read directly by the fused loss
rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
sharded(ids[rows, :-1], ids[rows, 1:]).backward()
pairs = [(p, q) for p, q in zip(sharded.parameters(), whole.parameters()) if q.requires_grad]
assert len(pairs) == (4 * cfg.num_hidden_layers if lora else len(list(whole.parameters())))
worst = max(((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max()).item() for p, q in pairs)
if dist.get_rank() == 0:
    print("worst", worst)
dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_fsdp2_sharded_gradients_equal_one_process(tmp_path, mode):
    """The fused loss reads lm_head.weight without calling the module: under FSDP2 (2 CPU processes, gloo) the
    root's unsharded weight is used and its gradient reduce-scattered like any other (tied embeddings included).
    LoRA with gradient checkpointing: the recomputed layers run on unsharded weights in backward too. QLoRA: the
    same over NF4 bases, whose packed buffers every rank keeps whole."""
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "fsdp_loss.py"
    script.write_text(FSDP_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29519", str(script), mode], cwd=repo, capture_output=True, text=True,
                            timeout=SLOW_TIMEOUT - 120,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split("worst")[-1])
    assert worst < 1e-5  # equal rows per rank: the mean of the two shards' means is the whole batch's mean
