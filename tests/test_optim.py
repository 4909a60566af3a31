"""The optimizer and the learning-rate schedule (trainer/loop.py's build_optimizer and set_learning_rate): Muon for
the decoder blocks' matrices with AdamW for the rest, as torch's own optimizers would step them; the WSD schedule;
Muon refused where it does not apply (LoRA, FSDP). Exact resume and DDP with Muon: tests/test_trainer.py."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import DistributedType

from model import ModelConfig, Transformer
from trainer.config import DPOConfig, LoraConfig, TrainConfig
from trainer.loop import Trainer, build_optimizer, lr_multiplier, set_learning_rate

CPU = torch.device("cpu")


def tiny_model() -> Transformer:
    """Untied head, q/k/v biases: matrices and vectors both inside and outside the blocks."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=False,
                                    qkv_bias=True))
    model.init_weights()
    return model


def backward(model: Transformer, step: int) -> None:
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(step))
    model(ids, ids).backward()


def test_muon_steps_equal_torch_muon_and_adamw_driven_directly():
    """build_optimizer's Muon + AdamW under set_learning_rate (warmup, then WSD) with clipping, step for step bitwise
    equal to torch.optim.Muon over the blocks' matrices and torch.optim.AdamW over the rest (decay on the embedding
    and head, none on norms and biases); its state dict reloads into a fresh one exactly."""
    cfg = TrainConfig(optimizer="muon", schedule="wsd", decay_ratio=0.5, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1,
                      weight_decay=0.1)
    ours, theirs = tiny_model(), tiny_model()
    optimizer = build_optimizer(ours, cfg, CPU)
    named = dict(theirs.named_parameters())
    hidden = [p for n, p in named.items() if n.startswith("model.layers.") and p.ndim == 2]
    assert len(hidden) == 2 * 7
    rest = [p for p in named.values() if not any(p is h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [named["model.embed_tokens.weight"], named["lm_head.weight"]]},
                               {"params": [p for p in rest if p.ndim == 1], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = 6
    lrs = [cfg.lr * f for f in (0.5, 1.0, 1.0, 1.0, 1 - 0.9 / 3, 1 - 0.9 * 2 / 3)]  # warmup 2, decay over the last 3
    for step in range(total):
        lr = set_learning_rate(optimizer, step, total, cfg)
        assert lr == pytest.approx(lrs[step], rel=1e-12)
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = lr
        for model in (ours, theirs):
            backward(model, step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), f"{name} after step {step}"
        if step == 2:  # go on with a fresh optimizer loaded from this one's state
            saved = copy.deepcopy(optimizer.state_dict())
            optimizer = build_optimizer(ours, cfg, CPU)
            optimizer.load_state_dict(saved)
            assert sum("momentum_buffer" in v for v in optimizer.state.values()) == len(muon.state) == len(hidden)


def test_adamw_keeps_one_torch_optimizer():
    model = tiny_model()
    optimizer = build_optimizer(model, TrainConfig(), CPU)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_wsd_schedule_warms_up_stays_flat_then_decays_linearly():
    cfg = TrainConfig(schedule="wsd", warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.1)
    f = [lr_multiplier(step, 100, cfg) for step in range(101)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10:81] == [1.0] * 71  # flat through step 80, where the last 20 steps' decay starts
    falls = [a - b for a, b in zip(f[80:], f[81:])]
    assert falls == pytest.approx([0.9 / 20] * 20)  # linear, reaching lr x min_lr_ratio at the end
    assert f[100] == pytest.approx(0.1) and f[99] > 0.1
    # the decay never eats into the warmup
    assert [lr_multiplier(s, 12, cfg) for s in range(10, 13)] == pytest.approx([1.0, 0.55, 0.1])


def old_learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    """The schedule as it was before WSD (one lr for every group)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_cosine_and_constant_are_unchanged_and_each_group_keeps_its_scale(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_steps=5, lr=3e-4)
    optimizer = build_optimizer(tiny_model(), cfg, CPU)
    optimizer.param_groups[1]["lr_scale"] = 0.5
    for step in range(60):
        lr = set_learning_rate(optimizer, step, 50, cfg)
        assert lr == pytest.approx(old_learning_rate(step, 50, cfg), rel=1e-12)
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr / 2]


def test_muon_is_refused_for_lora_and_under_fsdp(tmp_path):
    with pytest.raises(ValueError, match="--optimizer muon is for whole models"):
        LoraConfig(base="b", data="d", optimizer="muon")
    with pytest.raises(ValueError, match="--optimizer muon is for whole models"):
        DPOConfig(base="b", lora=True, data="d", optimizer="muon")
    DPOConfig(init="m", data="d", optimizer="muon")  # the whole model trains: fine
    with pytest.raises(ValueError, match="--decay-ratio"):
        TrainConfig(decay_ratio=1.5)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, device=CPU, is_main_process=True)
    with pytest.raises(ValueError, match="--optimizer muon is for one process or DDP"):
        Trainer(tiny_model(), None, TrainConfig(optimizer="muon", out_dir=str(tmp_path)), None, accelerator=fsdp)
