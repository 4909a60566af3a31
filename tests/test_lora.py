"""LoRA layers against PEFT (the reference) on tiny random Llama / Qwen2 / Baichuan-style checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from model import load_model, save_model
from model.lora import (
    LoRALinear,
    LoRASlice,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    save_adapter,
    set_lora_state_dict,
    unmerge_lora,
)
from trainer.activations import ActivationPolicy, apply_activation_policy

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 97


def hf_model(kind: str, kv_heads: int = 2):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, intermediate_size=160, max_position_embeddings=128,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=10000.0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1000000.0))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.float().eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(path)
    return request.param, path


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero B (a fresh adapter is an identity, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_model(kind: str, **config):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **config)
    return peft.get_peft_model(hf_model(kind), cfg)


def peft_lora_state(model) -> dict[str, torch.Tensor]:
    state = peft.get_peft_model_state_dict(model)
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def test_fresh_adapter_is_an_identity_and_only_adapters_train(hf_dir):
    kind, path = hf_dir
    model = load_model(path)
    with torch.no_grad():
        ref = model(IDS)
    config = apply_lora(model, r=4, alpha=8, targets="all-linear")
    assert config.targets == sorted(ALL)
    assert not isinstance(model.lm_head, LoRALinear)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_B.weight.abs().sum() == 0
    assert layer.lora_A.weight.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref, rtol=0, atol=0)
    if kind == "qwen2":  # q/k/v biases stay frozen in the base
        assert layer.base_layer.bias is not None and not layer.base_layer.bias.requires_grad


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_and_lora_gradients_as_peft(hf_dir, rslora):
    kind, path = hf_dir
    patterns = {} if rslora else dict(rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})
    ref = peft_model(kind, r=4, lora_alpha=8, target_modules=ALL, use_rslora=rslora, **patterns).train()
    randomize_lora(ref)
    ours = load_model(path).train()
    apply_lora(ours, r=4, alpha=8, targets=ALL, use_rslora=rslora, **patterns)
    set_lora_state_dict(ours, peft_lora_state(ref))
    assert ours.model.layers[1].self_attn.o_proj.lora_A.weight.shape[0] == (4 if rslora else 2)

    labels = torch.roll(IDS, -1, dims=1)
    ref_logits = ref(input_ids=IDS).logits
    torch.testing.assert_close(ours(IDS), ref_logits, rtol=1e-4, atol=1e-5)
    torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    ours(IDS, labels).backward()
    ref_grads = {k.replace(".default", ""): p.grad for k, p in ref.named_parameters() if p.requires_grad}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert {k.removeprefix("base_model.model.") for k in ref_grads} == set(ours_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(ours_grads[k.removeprefix("base_model.model.")], g, rtol=1e-4, atol=1e-6)


class FullSizeFp32(TorchDispatchMode):
    """Records every op that outputs an fp32 tensor of `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == self.numel:
                self.ops.append(str(func))
        return out


def test_under_autocast_the_adapter_equals_peft_bitwise_with_no_fp32_copy_of_its_input():
    """How LoRA trains: a bf16 base, fp32 adapters, bf16 autocast. PEFT casts the input to the adapter's fp32 first;
    we skip that copy (the matmul runs in bf16 either way), and the output must not change by a bit."""
    ref = peft.get_peft_model(hf_model("llama").to(torch.bfloat16),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0))
    randomize_lora(ref)
    ref_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    assert ref_layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for dropout in (0.0, 0.1):
        ours = LoRALinear(ref_layer.base_layer, r=4, alpha=8, dropout=dropout).eval()
        with torch.no_grad():
            ours.lora_A.weight.copy_(ref_layer.lora_A["default"].weight)
            ours.lora_B.weight.copy_(ref_layer.lora_B["default"].weight)
        with torch.autocast("cpu", dtype=torch.bfloat16), FullSizeFp32(x.numel()) as seen:
            got = ours.train(dropout > 0)(x)
        assert seen.ops == [], f"fp32 copies of the input: {seen.ops}"
        if dropout == 0:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.testing.assert_close(got, ref_layer(x), rtol=0, atol=0)


def test_adapters_round_trip_between_peft_and_ours(hf_dir, tmp_path):
    kind, path = hf_dir
    ref = peft_model(kind, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    randomize_lora(ref)
    ref.eval()
    ref.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = ref(input_ids=IDS).logits

    ours = load_model(path)
    load_adapter(ours, tmp_path / "peft")  # PEFT -> ours
    assert not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), expected, rtol=1e-4, atol=1e-5)

    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(path))  # ours -> PEFT
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
    back = peft.PeftModel.from_pretrained(hf_model(kind), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["rank_pattern"] == {"down_proj": 2} and config["base_model_name_or_path"] == str(path)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores(hf_dir, tmp_path):
    _, path = hf_dir
    model = load_model(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets="all-linear", use_rslora=True)
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-4, atol=1e-5)
        merge_lora(model)  # idempotent
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-4, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, base[k.replace(".base_layer", "")], rtol=0, atol=1e-6)
    merged = merge_and_unload(model)
    save_model(merged, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(IDS), unmerged, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_lora_gradients(hf_dir):
    _, path = hf_dir
    grads = []
    for ckpt in (False, True):
        model = load_model(path).train()
        apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"], dropout=0.0)
        randomize_lora(model)
        apply_activation_policy(model, ActivationPolicy(checkpointing=ckpt))
        model(IDS, torch.roll(IDS, -1, 1)).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])


@pytest.mark.parametrize("baichuan", [False, True])
def test_disabled_adapters_compute_the_base_and_draw_no_random_numbers(tmp_path, baichuan):
    """DPO's reference for LoRA: inside `adapters_disabled` the model is its base bit for bit (split and Baichuan's
    packed q/k/v alike), its adapter dropout draws nothing, nesting is harmless; after it the adapters are back.
    Merged adapters cannot be disabled."""
    baichuan_dir(tmp_path) if baichuan else hf_model("llama").save_pretrained(tmp_path)
    model = load_model(tmp_path).train()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, r=4, alpha=8, dropout=0.5, targets=["W_pack", "o_proj"] if baichuan else "all-linear")
    randomize_lora(model)
    rng = torch.get_rng_state()
    with torch.no_grad(), adapters_disabled(model):
        with adapters_disabled(model):
            torch.testing.assert_close(model(IDS), base, rtol=0, atol=0)
        torch.testing.assert_close(model(IDS), base, rtol=0, atol=0)
        assert torch.equal(torch.get_rng_state(), rng)
        adapted = model.eval()(IDS)
    assert (model(IDS) - base).abs().max() > 1e-3 and torch.equal(adapted, base)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"), adapters_disabled(model):
        pass


# ---- Baichuan: one W_pack adapter over our split q/k/v ----------------------------------------------------------
def baichuan_dir(path):
    """A Baichuan-7B-style directory built from a tiny MHA Llama: W_pack = cat(q, k, v)."""
    hf = hf_model("llama", kv_heads=4)
    state = {}
    for k, v in hf.state_dict().items():
        if ".self_attn.q_proj." in k:
            prefix = k.split("q_proj")[0]
            state[prefix + "W_pack.weight"] = torch.cat([hf.state_dict()[prefix + f"{n}_proj.weight"] for n in "qkv"])
        elif ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k:
            state[k] = v.clone()
    save_file(state, path / "model.safetensors")
    cfg = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", "hidden_size": 64,
           "intermediate_size": 160, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6, "vocab_size": VOCAB, "hidden_act": "silu", "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    return hf


def test_baichuan_w_pack_adapter_maps_exactly_onto_split_qkv(tmp_path):
    hf = baichuan_dir(tmp_path)
    # A PEFT-on-Baichuan adapter: one A [r, 64] and one B [192, r] per layer's W_pack, plus o_proj.
    g = torch.Generator().manual_seed(5)
    r, d = 4, 64
    adapter = {}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn."
        adapter[p + "W_pack.lora_A.weight"] = torch.randn(r, d, generator=g) * 0.1
        adapter[p + "W_pack.lora_B.weight"] = torch.randn(3 * d, r, generator=g) * 0.1
        adapter[p + "o_proj.lora_A.weight"] = torch.randn(r, d, generator=g) * 0.1
        adapter[p + "o_proj.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.1
    (tmp_path / "adapter").mkdir()
    save_file(adapter, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.1,
        "target_modules": ["W_pack", "o_proj"], "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": "baichuan-inc/Baichuan-7B", "inference_mode": True}))

    # Reference: PEFT on the equivalent Llama, q/k/v each with the shared A and their rows of B.
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" not in name:
                continue
            layer = name.split("layers.")[1].split(".")[0]
            proj = name.split("self_attn.")[1].split(".")[0]
            kind = "A" if "lora_A" in name else "B"
            key = f"base_model.model.model.layers.{layer}.self_attn."
            if proj == "o_proj":
                p.copy_(adapter[key + f"o_proj.lora_{kind}.weight"])
            else:
                t = adapter[key + f"W_pack.lora_{kind}.weight"]
                p.copy_(t if kind == "A" else t["qkv".index(proj[0]) * d:("qkv".index(proj[0]) + 1) * d])
    ref.eval()

    ours = load_model(tmp_path)
    load_adapter(ours, tmp_path / "adapter")
    attn = ours.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LoRASlice) and attn.q_proj.adapter is attn.W_pack is attn.v_proj.adapter
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)

    save_adapter(ours, tmp_path / "saved")  # written back as a W_pack adapter, tensor for tensor
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert set(saved) == set(adapter)
    for k in saved:
        torch.testing.assert_close(saved[k], adapter[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["target_modules"] == ["W_pack",
                                                                                                       "o_proj"]
    with torch.no_grad():  # merging the shared adapter into split q/k/v
        expected = ours(IDS)
        merge_lora(ours)  # W_pack stays, so the packed path must now skip the update
        torch.testing.assert_close(ours(IDS), expected, rtol=1e-4, atol=1e-5)
        merged = merge_and_unload(ours)
        assert not hasattr(merged.model.layers[0].self_attn, "W_pack")
        torch.testing.assert_close(merged(IDS), expected, rtol=1e-4, atol=1e-5)


def test_baichuan_all_linear_targets_w_pack(tmp_path):
    baichuan_dir(tmp_path)
    model = load_model(tmp_path)
    config = apply_lora(model, r=2, alpha=4, targets="all-linear")
    assert config.targets == ["W_pack", "down_proj", "gate_proj", "o_proj", "up_proj"]
    state = lora_state_dict(model)
    assert state["model.layers.0.self_attn.W_pack.lora_B.weight"].shape == (192, 2)
    assert not any("q_proj.lora" in k for k in state)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(load_model(tmp_path), targets=["q_proj"])


def packed_peft(attn: torch.nn.Module, dropout: float) -> torch.nn.Module:
    """PEFT on a real fused `W_pack` = cat(q, k, v) rows of `attn`, with the same A and B as attn's shared adapter."""
    adapter, bases = attn.W_pack, [p.base_layer for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    module = torch.nn.Module()
    module.W_pack = torch.nn.Linear(bases[0].in_features, sum(b.out_features for b in bases), bias=False)
    with torch.no_grad():
        module.W_pack.weight.copy_(torch.cat([b.weight for b in bases]))
    config = peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=dropout, target_modules=["W_pack"])
    peft.inject_adapter_in_model(config, module)
    with torch.no_grad():
        module.W_pack.lora_A["default"].weight.copy_(adapter.lora_A.weight)
        module.W_pack.lora_B["default"].weight.copy_(adapter.lora_B.weight)
    return module.train()


def test_baichuan_packed_qkv_share_one_dropout_mask_and_train_as_peft(tmp_path):
    """In training (dropout 0.5) q/k/v and the shared A/B gradients equal PEFT's fused W_pack under the same seed."""
    baichuan_dir(tmp_path)
    model = load_model(tmp_path).train()
    apply_lora(model, r=4, alpha=8, targets=["W_pack"], dropout=0.5)
    randomize_lora(model)
    attn = model.model.layers[0].self_attn
    ref = packed_peft(attn, dropout=0.5)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 64, generator=g)
    cotangents = torch.randn(3, 2, 12, 64, generator=g)
    ours_lora = {"A": attn.W_pack.lora_A.weight, "B": attn.W_pack.lora_B.weight}
    ref_lora = {"A": ref.W_pack.lora_A["default"].weight, "B": ref.W_pack.lora_B["default"].weight}
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = ref.W_pack(x).split(64, dim=-1)
        torch.manual_seed(seed)
        got = attn.project_qkv(x)  # what Attention.forward calls
        for y, e in zip(got, expected):
            torch.testing.assert_close(y, e, rtol=1e-5, atol=1e-6)
        torch.manual_seed(seed)  # calling the slices one by one draws three masks: k and v then differ from PEFT
        separate = [p(x) for p in projections]
        assert not torch.allclose(separate[1], expected[1], rtol=1e-3, atol=1e-3)

        for p in (*ours_lora.values(), *ref_lora.values()):
            p.grad = None
        sum((y * c).sum() for y, c in zip(got, cotangents)).backward()
        sum((e * c).sum() for e, c in zip(expected, cotangents)).backward()
        for k in ours_lora:
            assert ours_lora[k].grad.abs().sum() > 0
            torch.testing.assert_close(ours_lora[k].grad, ref_lora[k].grad, rtol=1e-5, atol=1e-6)


def test_baichuan_attention_draws_one_mask_per_layer_and_trains_with_checkpointing(tmp_path):
    """The model's own forward goes through the packed path: one W_pack dropout per layer (recomputed once under
    gradient checkpointing, with the same mask: the same gradients)."""
    baichuan_dir(tmp_path)
    grads = []
    for ckpt in (False, True):
        model = load_model(tmp_path).train()
        apply_lora(model, r=4, alpha=8, targets=["W_pack"], dropout=0.5)
        randomize_lora(model)
        apply_activation_policy(model, ActivationPolicy(checkpointing=ckpt))
        draws = []
        for layer in model.model.layers:
            layer.self_attn.W_pack.lora_dropout.register_forward_hook(lambda *_: draws.append(1))
        torch.manual_seed(0)
        model(IDS, torch.roll(IDS, -1, 1)).backward()
        assert len(draws) == len(model.model.layers) * (2 if ckpt else 1)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0
        torch.testing.assert_close(grads[1][k], grads[0][k])


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_unsupported_or_mismatched_adapters_raise_naming_the_file(tmp_path):
    path = tmp_path / "model"
    hf_model("llama").save_pretrained(path)
    model = load_model(path)
    apply_lora(model, r=4, alpha=8, targets=["q_proj"])
    save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for key, value in [("use_dora", True), ("fan_in_fan_out", True), ("bias", "all"), ("peft_type", "IA3"),
                       ("modules_to_save", ["lm_head"])]:
        config_file.write_text(json.dumps(good | {key: value}))
        with pytest.raises(ValueError, match=key) as err:
            load_adapter(load_model(path), tmp_path / "a")
        assert str(config_file) in str(err.value)
    config_file.write_text(json.dumps(good | {"r": 8}))  # weights of rank 4
    with pytest.raises(ValueError, match="adapter_model.safetensors.*q_proj.lora_A.weight has shape"):
        load_adapter(load_model(path), tmp_path / "a")
    config_file.write_text(json.dumps(good | {"target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ValueError, match="missing"):
        load_adapter(load_model(path), tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=["v_proj"])
    with pytest.raises(ValueError, match="match no module.*q_proj"):
        apply_lora(load_model(path), targets=["W_pack"])


def test_mark_only_lora_trainable_and_lora_state_dict(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    apply_lora(model, r=4, alpha=8, targets=r".*\.mlp\.(gate|up)_proj")  # a regex, full-matched as in PEFT
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_trainable(model)
    state = lora_state_dict(model)
    assert sorted({k.split(".")[-3] for k in state}) == ["gate_proj", "up_proj"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(state)
