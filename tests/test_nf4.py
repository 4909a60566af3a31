"""NF4 + double quantization against its definition and against bitsandbytes; the QLoRA load path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import model.nf4 as nf4
import model.nf4_kernel as nf4_kernel
from model import load_model
from model.lora import LoRALinear, apply_lora, merge_lora
from model.nf4 import (
    BLOCK_LINEARS,
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Linear,
    NF4Weight,
    nf4_hook,
    pack_nibbles,
    unpack_nibbles,
)
from trainer.activations import ActivationPolicy, apply_activation_policy


def test_nf4_table_is_bitsandbytes_normal_map():
    """create_normal_map(offset=0.9677083, use_extra_value=True): 8 positive and 7 negative normal quantiles and 0."""
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].double().numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].double().numpy())).tolist()
    values = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    torch.testing.assert_close(NF4_CODE.double(), values / values.abs().max(), rtol=0, atol=1e-6)
    assert DYNAMIC_CODE.numel() == 256 and DYNAMIC_CODE.unique().numel() == 256
    assert DYNAMIC_CODE.min() > -1 and DYNAMIC_CODE.max() == 1 and (DYNAMIC_CODE == 0).any()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=300).filter(lambda q: len(q) % 2 == 0))
def test_pack_unpack_is_exact(indices):
    q = torch.tensor(indices, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2
    assert torch.equal(unpack_nibbles(packed), q)
    assert torch.equal(packed[0] >> 4, q[0])  # first element in the high nibble (bnb / torchao order)


def gaussian(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def test_quantize_picks_the_nearest_code_and_dequantize_inverts_it():
    w = gaussian((96, 200))  # 19200 values: 300 blocks, a partial group of scales
    nf4 = NF4Weight.quantize(w)
    absmax = nf4.block_absmax()
    blocks = w.view(-1, 64)
    scaled = blocks / blocks.abs().amax(1, keepdim=True)
    brute = (scaled.reshape(-1, 1) - NF4_CODE).abs().argmin(1)
    assert torch.equal(unpack_nibbles(nf4.packed).long(), brute)
    expected = (NF4_CODE[brute].view(-1, 64) * absmax[:, None]).view(w.shape)
    torch.testing.assert_close(nf4.dequantize(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_triton_dequantization_equals_eager_bit_for_bit(device, request):
    """Eager CUDA code dequantizes with one Triton kernel: exactly the PyTorch ops' result, with no multiply-add
    contraction in the scales (on CUDA it changed 46 of a 7B MLP weight's 45M values). On the CPU the kernel runs in
    Triton's interpreter, whose fp32 -> bf16 cast truncates where the GPU's rounds to nearest even: there bf16 is
    left to the GPU run."""
    if device == "cpu":
        request.getfixturevalue("triton_interpreter")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for shape in [(5, 13), (96, 200)] + ([(11008, 4096)] if device == "cuda" else []):  # 65 values: a partial block
        weight = NF4Weight.quantize(gaussian(shape)).to(device)
        dynamic, code, pairs = nf4.decoding_tables(weight.device)
        for dtype in dtypes:
            eager = nf4._decode_and_dequantize(*weight.tensors(), dynamic, pairs, weight.shape, dtype)
            kernel = nf4_kernel.dequantize(*weight.tensors(), dynamic, code, weight.shape, dtype, nf4.BLOCK_SIZE,
                                           nf4.SCALE_BLOCK_SIZE)
            assert kernel.dtype == eager.dtype == dtype and torch.equal(kernel, eager), (shape, dtype)
            assert torch.equal(weight.dequantize(dtype), eager)  # on CUDA through the kernel


def test_dequantization_error_is_within_the_bound_on_gaussian_weights():
    w = gaussian((512, 1024))
    nf4 = NF4Weight.quantize(w)
    err = (nf4.dequantize() - w).abs().view(-1, 64)
    true_absmax = w.view(-1, 64).abs().amax(1)
    approx_absmax = nf4.block_absmax()
    # Double quantization: the 8-bit dynamic code keeps every block scale within 1% of the true one here.
    assert ((approx_absmax - true_absmax).abs() / true_absmax).max() < 0.01
    # |w - q*a'| <= |w/a - q| a + |q| |a - a'|, and |w/a - q| <= half the widest NF4 gap (0.1385, between 0.72 and 1).
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = half_gap * true_absmax + (approx_absmax - true_absmax).abs()
    assert (err <= bound[:, None] * (1 + 1e-5)).all()
    # NF4 is information-theoretically good for normal data: RMS error ~ 9-10% of the weights' std.
    rel_rms = (err.pow(2).mean().sqrt() / w.std()).item()
    assert 0.05 < rel_rms < 0.11


def test_memory_per_parameter_is_about_4_13_bits():
    w = gaussian((1024, 4096), torch.bfloat16)
    layer = NF4Linear(NF4Weight.quantize(w))
    resident = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert resident == layer.weight.nbytes()
    bits = 8 * resident / w.numel()
    assert 4.12 < bits < 4.135, bits  # 4 + 8/64 + 32/(64*256), plus one fp32 offset
    assert not list(layer.parameters())  # nothing trainable, nothing float of weight size


def test_nf4_linear_forward_and_backward_keep_only_4_bit_data():
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 192, bias=True)
    layer = NF4Linear.from_linear(dense)
    w = layer.weight.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, dense.bias))
    assert saved and all(t.dtype == torch.uint8 or t.numel() <= w.numel() // 64 for t in saved)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w)
    # bf16 compute: the weight is dequantized to the input's dtype
    xb = x.detach().bfloat16()
    torch.testing.assert_close(layer(xb), F.linear(xb, w.bfloat16(), dense.bias.bfloat16().detach()),
                               rtol=0.02, atol=0.02)


# ---- QLoRA load path ---------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=192, max_position_embeddings=128, tie_word_embeddings=False)
    cls, cfg = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if request.param == "llama" else
                (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    hf = cls(cfg(**common))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, path


IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))


def test_nf4_hook_quantizes_block_linears_while_loading(hf_dir):
    kind, path = hf_dir
    dense = load_model(path)
    quant = load_model(path, tensor_hook=nf4_hook())
    quantized = {n: m for n, m in quant.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 2 * len(BLOCK_LINEARS)
    for name, module in quantized.items():
        ref = dense.get_submodule(name)
        with torch.no_grad():  # the dense model with each weight replaced by its NF4 round trip
            ref.weight.copy_(module.weight.dequantize())
        assert (module.bias is None) == (ref.bias is None)
        if ref.bias is not None:  # Qwen2's q/k/v bias, read before its weight, carried over
            assert kind == "qwen2" and torch.equal(module.bias, ref.bias)
    assert type(quant.lm_head) is torch.nn.Linear and type(quant.model.embed_tokens) is torch.nn.Embedding
    assert all(p.device.type == "cpu" for p in quant.parameters())
    with torch.no_grad():
        torch.testing.assert_close(quant(IDS), dense(IDS), rtol=1e-4, atol=1e-5)
    quant_bytes = sum(t.numel() * t.element_size() for t in quant.state_dict().values())
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    assert quant_bytes < dense_bytes  # (embeddings dominate at this size; see the per-parameter test)


def test_nf4_hook_carries_a_bias_read_after_its_weight():
    torch.manual_seed(0)
    from model import ModelConfig, Transformer
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=16, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, qkv_bias=True))
    hook = nf4_hook(["q_proj"])
    w, b = torch.randn(64, 64), torch.randn(64)
    assert hook(model, "model.layers.0.self_attn.q_proj.weight", w)
    assert model.model.layers[0].self_attn.q_proj.bias.device.type == "meta"
    assert hook(model, "model.layers.0.self_attn.q_proj.bias", b)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, b)
    assert not hook(model, "model.layers.0.self_attn.k_proj.weight", w)
    assert not hook(model, "lm_head.weight", torch.randn(16, 64))
    with pytest.raises(ValueError, match="lm_head"):
        nf4_hook(["lm_head"])


@pytest.mark.slow
def test_qlora_trains_adapters_on_the_4_bit_base_with_gradient_checkpointing(hf_dir):
    _, path = hf_dir
    labels = torch.roll(IDS, -1, 1)
    grads = []
    for ckpt, compiled in ((False, False), (True, False), (True, True)):  # compiled: the trainer's --qlora --compile
        model = load_model(path, tensor_hook=nf4_hook()).train()
        torch.manual_seed(2)
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            nf4._TABLES.clear()  # as in a fresh process: the decoding tables are made when the blocks are compiled
        apply_activation_policy(model, ActivationPolicy(checkpointing=ckpt, compile_blocks=compiled))
        model(IDS, labels).backward()
        assert not counters["graph_break"]  # a break would run a checkpointed block eagerly
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])
        torch.testing.assert_close(grads[2][k], grads[0][k], rtol=1e-4, atol=1e-5)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, NF4Linear)
    with pytest.raises(ValueError, match="4-bit base"):
        merge_lora(model)


# ---- bitsandbytes (CPU backend here; CUDA on the GPU machine) -----------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bnb_cpu_lut_codes(x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' native CPU kernel (0.50) for 8-bit blockwise codes of values x already divided by their block
    absmax: a 65,536-entry table over [-1, 1], entry i the code nearest the grid value -1 + 2i / 65535 (fp32 steps),
    looked up at trunc((x + 1) * 0.5 * 65535 + 0.5). A replica, to show where and why its codes differ from ours."""
    mid = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    table = torch.searchsorted(mid, grid, side="left")
    return table[((x.clamp(-1, 1) + 1.0) * 0.5 * 65535.0 + 0.5).long()].to(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_bitsandbytes_nf4_with_double_quantization(device, dtype):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    bnb_f = bnb.functional
    w = gaussian((384, 320), dtype).to(device)  # 1920 blocks: 7.5 groups of 256 scales
    q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = NF4Weight.quantize(w)
    assert torch.equal(q.view(-1), ours.packed)  # identical 4-bit codes, identical nibble order
    assert torch.equal(state.offset, ours.offset)
    assert torch.equal(state.state2.absmax, ours.scale_absmax)
    # 8-bit scale codes: ours is the exact nearest code of the dynamic map (ties to the lower one), as bnb's
    # pure-PyTorch backend computes it and its CUDA kernel's search finds it (but within float rounding of a midpoint).
    # Its native CPU kernel (0.50) looks codes up in a table instead: a few differ, every one of them the table's.
    n = ours.scales.numel()
    centred = F.pad(w.float().reshape(-1, 64).abs().amax(1) - ours.offset, (0, -n % 256)).view(-1, 256)
    c = ours.scale_absmax[:, None]
    x = (centred * (1.0 / c)).view(-1)[:n]  # what bnb's kernels and ours quantize
    assert torch.equal(ours.scales, nf4._nearest(x, DYNAMIC_CODE))
    diff = state.absmax != ours.scales
    if device == "cpu" and tuple(int(v) for v in bnb.__version__.split(".")[:2]) >= (0, 50):
        assert torch.equal(state.absmax, bnb_cpu_lut_codes(x.cpu()))  # every difference is the table's
        assert int(diff.sum()) < 0.01 * n
    elif device == "cpu":  # older native CPU kernels: a binary search, sometimes off by one code
        assert (state.absmax.int() - ours.scales.int()).abs().max() <= 1 and int(diff.sum()) < 0.01 * n
    else:
        mid = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]).to(device)
        near_mid = (x[:, None] - mid[None, :]).abs().amin(1) <= 1e-6 * x.abs().clamp(min=1e-3)
        assert not bool((diff & ~near_mid).any())
    # bnb's dequantization of OUR packed state equals ours bit for bit.
    state.absmax = ours.scales
    torch.testing.assert_close(bnb_f.dequantize_4bit(ours.packed.view(-1, 1), state), ours.dequantize(),
                               rtol=0, atol=0)
