"""The decoder: causality, KV cache, padding, SDPA vs explicit attention, and logits parity with transformers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from model.config import PRESETS

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, max_position_embeddings=128)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**(TINY | overrides))).eval()


def test_presets_have_the_advertised_sizes():
    sizes = {name: cfg.num_parameters() for name, cfg in PRESETS.items()}
    assert 1e6 <= sizes["tiny"] <= 5e6
    assert 0.08e9 <= sizes["small"] <= 0.13e9
    assert 0.2e9 <= sizes["base"] <= 0.3e9
    assert 0.4e9 <= sizes["medium"] <= 0.6e9
    model = Transformer(ModelConfig.preset("tiny"))
    assert model.num_parameters() == sizes["tiny"]


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 20))
    ref = model(ids)
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        torch.testing.assert_close(out[:, :t], ref[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], ref[:, t])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_forward(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    ids = torch.randint(0, 97, (3, 24))
    full = model(ids)
    cache = model.setup_cache(3, 32)
    pieces = [model(ids[:, :10], cache=cache)]  # prefill
    pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 20)]  # one token at a time
    pieces.append(model(ids[:, 20:], cache=cache))  # a few tokens at once against the cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 24


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(side):
    model = tiny_model()
    rows = [torch.randint(2, 97, (n,)) for n in (12, 5, 9)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out).all()
    for i, r in enumerate(rows):
        alone = model(r[None])[0]
        got = out[i][mask[i].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_left_padded_cache_decoding_equals_rows_alone():
    model = tiny_model()
    rows = [torch.randint(2, 97, (n,)) for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    cache = model.setup_cache(2, 16)
    last = model(ids, attention_mask=mask, cache=cache)[:, -1]
    nxt = torch.tensor([[5], [6]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = model(nxt, attention_mask=mask, cache=cache)[:, -1]
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]])[None])[0]
        torch.testing.assert_close(last[i], alone[-2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[i], alone[-1], rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(0, 97, (9,)), torch.randint(0, 97, (6,))
    packed = model(torch.cat([a, b])[None], segment_ids=torch.tensor([[0] * 9 + [1] * 6]))[0]
    torch.testing.assert_close(packed[:9], model(a[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[9:], model(b[None])[0], rtol=1e-5, atol=1e-5)


def test_packed_sequences_start_at_each_segment_and_row():
    from model.transformer import packed_sequences, varlen_usable
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 3, 3]])  # the second row opens with segment 2
    assert packed_sequences(segments).cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    assert packed_sequences(torch.tensor([[5, 5], [5, 5]])).cu_seqlens.tolist() == [0, 2, 4]  # rows never join
    assert not varlen_usable(torch.device("cpu"), torch.bfloat16, False)  # the CPU masks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length flash attention needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_equals_the_masked_path_forward_and_backward(kv_heads, monkeypatch):
    import model.transformer as T
    torch.manual_seed(0)
    model = tiny_model(num_key_value_heads=kv_heads).cuda()
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    segments = torch.tensor([[0] * 20 + [1] * 30 + [-1] * 14, [2] * 64], device="cuda")
    labels = torch.randint(0, 97, (2, 64), device="cuda")

    def run():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels, segment_ids=segments)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    if not T.varlen_usable(ids.device, torch.float32, kv_heads != 4):
        pytest.skip("this torch has no variable-length attention for grouped queries")
    varlen = run()
    monkeypatch.setattr(T, "varlen_usable", lambda *a: False)
    masked = run()
    torch.testing.assert_close(varlen[0], masked[0], rtol=2e-2, atol=2e-2)
    for g, h in zip(varlen[1], masked[1]):
        torch.testing.assert_close(g, h, rtol=5e-2, atol=5e-3)


def test_sdpa_equals_explicit_attention():
    model = tiny_model(num_key_value_heads=2)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 11, 64)
    pos = torch.arange(11).expand(2, 11)
    cos, sin = model.model.rotary(pos, x.dtype)
    got = attn(x, cos, sin, None, None)

    from model.transformer import apply_rotary
    q = attn.q_proj(x).view(2, 11, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 11, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.v_proj(x).view(2, 11, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(torch.triu(torch.ones(11, 11, dtype=torch.bool), 1), float("-inf"))
    ref = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 11, 64)
    torch.testing.assert_close(got, attn.o_proj(ref), rtol=1e-5, atol=1e-5)


def test_loss_equals_cross_entropy_on_logits_and_ignores_masked():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[0, :4] = -100
    logits = model(ids)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels), ref)
    assert model(ids, torch.full_like(labels, -100)).item() == 0.0


def test_tied_embeddings_share_storage_and_init_scales_residuals():
    model = Transformer(ModelConfig(**TINY, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q_std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.003 and abs(o_std - 0.02 / 2) < 0.002  # 1/sqrt(2 * 2 layers)


def test_rotary_tables_grow_past_max_position_embeddings():
    """A sequence or cache longer than max_position_embeddings extends the cos/sin tables: the same logits as a
    model configured long enough from the start, whole or decoded step by step through the cache."""
    short, long = tiny_model(max_position_embeddings=16), tiny_model(max_position_embeddings=64)
    long.load_state_dict(short.state_dict())
    ids = torch.randint(0, 97, (1, 24))
    ref = long(ids)
    torch.testing.assert_close(short(ids), ref, rtol=0, atol=0)
    fresh = tiny_model(max_position_embeddings=16)
    cache = fresh.setup_cache(1, 30)
    assert len(fresh.model.rotary.cos) == 30
    steps = [fresh(ids[:, :8], cache=cache)] + [fresh(ids[:, t:t + 1], cache=cache) for t in range(8, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, rtol=1e-5, atol=1e-5)


# ---- parity with transformers ----------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def hf_model(kind: str, tie: bool = False):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # transformers may zero-init biases and norms: randomize everything
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(-0.5, 1.5)
    return model.float().eval()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_hf_checkpoint_loads_with_the_same_logits(tmp_path, kind, tie):
    from model import load_model
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.qkv_bias == (kind == "qwen2")
    ids = torch.randint(0, 97, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: positions must follow the mask as in HF
    with torch.no_grad():
        for m in (None, mask):
            ref = hf(input_ids=ids, attention_mask=m).logits
            got = ours(ids, attention_mask=m)
            keep = slice(None) if m is None else m.bool()
            assert (got[keep] - ref[keep]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_our_directory_loads_in_transformers(tmp_path, tie):
    from model import save_model
    ours = tiny_model(tie_word_embeddings=tie, qkv_bias=False)
    save_model(ours, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() < 1e-4


def test_qwen2_style_model_saves_as_qwen2_and_loads_in_transformers(tmp_path):
    from model import load_model, save_model
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    save_model(load_model(tmp_path / "hf"), tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (back(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max().item() < 1e-4


def test_baichuan_w_pack_directory_loads_with_the_same_logits(tmp_path):
    """A Baichuan-7B-style directory built from a tiny Llama: q/k/v fused into W_pack, a persistent inv_freq
    buffer per layer, the BaiChuanForCausalLM config (no rope_theta, no kv heads), legacy .bin weights."""
    from model import load_model
    hf = hf_model("llama")
    hf.config.num_key_value_heads = 4
    hf = transformers.LlamaForCausalLM(hf.config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    hf.eval()
    state = {}
    for k, v in hf.state_dict().items():
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            prefix = k.split("q_proj")[0]
            state[prefix + "W_pack.weight"] = torch.cat(
                [v, hf.state_dict()[prefix + "k_proj.weight"], hf.state_dict()[prefix + "v_proj.weight"]])
            state[prefix + "rotary_emb.inv_freq"] = torch.ones(8)
            continue
        state[k] = v.clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", "auto_map": {},
           "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_hidden_layers": 2,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "vocab_size": 97, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    ours = load_model(tmp_path)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-4


def test_static_cache_steps_equal_the_dynamic_cache():
    """The static-shape path (what compiled / CUDA-graph decoding runs) gives the dynamic path's logits, with and
    without left padding."""
    model = tiny_model()
    ids = torch.randint(2, 97, (2, 9))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    for attention_mask in (None, mask):
        dyn = model.setup_cache(2, 16)
        sta = model.setup_cache(2, 16)
        m = None if attention_mask is None else attention_mask[:, :6]
        ref = model(ids[:, :6], attention_mask=m, cache=dyn)
        got = model(ids[:, :6], cache=sta, cache_position=torch.arange(6), attention_mask=attention_mask)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for t in range(6, 9):
            m = None if attention_mask is None else attention_mask[:, :t + 1]
            ref = model(ids[:, t:t + 1], attention_mask=m, cache=dyn)
            got = model(ids[:, t:t + 1], cache=sta, cache_position=torch.tensor([t]), attention_mask=attention_mask)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_logits_to_keep_gives_the_last_positions_only():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:], rtol=1e-6, atol=1e-6)


