"""DPO (trainer/dpo.py, `train.py dpo`): losses, rewards and gradients equal TRL's DPOTrainer (and TRL + PEFT for
LoRA) on a tiny random Llama; every pair format on real and small records; masks; resume; the loop's metrics."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_lora import hf_model, randomize_lora
from test_trainer import QA, write_split

import train
from model import ModelConfig, Transformer, load_model, save_model
from model.lora import apply_lora, lora_state_dict, set_lora_state_dict
from model.loss import IGNORE_INDEX
from trainer.data import PairExamples, PairLoader, pair_loader, tokenize_pairs
from trainer.dpo import (
    STATS,
    DPOObjective,
    FrozenReference,
    PreferenceLoss,
    as_scorer,
    base_reference,
    sequence_log_probs,
)
from utils.corpora import Tally
from utils.pairs import Pair, pair_splits, read_pairs, write_pair_shards, write_pairs

transformers = pytest.importorskip("transformers")
VOCAB = 97


@pytest.fixture(autouse=True)
def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---- parity with TRL -------------------------------------------------------------------------------------------------
def token_triples(seed: int = 5) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of four pairs of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(2, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(p), ids(c), ids(r)) for p, c, r in ((5, 4, 6), (9, 7, 3), (3, 2, 5), (6, 8, 8))]


def our_batch(triples) -> dict[str, torch.Tensor]:
    """All the pairs in one packed batch (rows of 2 x 24 positions)."""
    loader = PairLoader(PairExamples.build(triples, {}), pad_id=0, max_seq_len=24, batch_size=len(triples))
    (batch,) = loader.eval_batches()
    assert len(batch["pair_ids"]) == len(triples) and len(batch["input_ids"]) < len(triples)  # pairs share rows
    return batch


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama (the reference) and the same with every weight nudged (the policy)."""
    root = tmp_path_factory.mktemp("llama")
    reference = hf_model("llama")
    reference.save_pretrained(root / "reference")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    reference.save_pretrained(root / "policy")
    return root / "policy", root / "reference"


def trl_trainer(tmp_path: Path, policy, reference=None, peft_config=None, **config):
    """TRL's DPOTrainer (its own dataset tokenization unused: batches come from its collator)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                         activation_checkpointing=False, max_length=None, **config)
    data = datasets.Dataset.from_dict({"prompt": ["t2 t3"], "chosen": ["t4"], "rejected": ["t5"]})
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tok,
                          peft_config=peft_config)


def trl_step(trainer, triples) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """(loss, metrics, gradients by our parameter names) of one batch through DPOTrainer.compute_loss."""
    trainer.model.train().zero_grad()
    trainer._metrics["train"].clear()
    inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in triples])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {re.sub(r"^base_model\.model\.|\.default", "", k): p.grad for k, p in trainer.model.named_parameters()
             if p.requires_grad}
    return loss.detach(), metrics, grads


def our_step(policy, objective, triples) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    policy.train().zero_grad()
    batch = our_batch(triples)
    loss, stats = objective(policy, batch)
    loss.backward()
    metrics = {k: v / len(triples) for k, v in zip(STATS, stats.tolist())}
    return loss.detach(), metrics, {k: p.grad for k, p in policy.named_parameters() if p.requires_grad}


def assert_same(ours, theirs) -> None:
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = ours, theirs
    assert sum(g.norm() for g in ref_grads.values()) > 1e-3  # something to compare
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k in STATS:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-5), k
    assert grads.keys() == ref_grads.keys() and grads
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_loss_rewards_and_gradients_equal_trls_dpo_trainer(llama_dirs, tmp_path, loss):
    """Policy and reference differ (nudged weights), so the rewards are not 0. TRL's batch: padded rows, chosen
    then rejected; ours: pairs packed side by side in fewer rows. Loss, every TRL metric and every gradient agree."""
    policy_dir, reference_dir = llama_dirs
    beta = 0.3 if loss == "ipo" else 2.0  # large enough that the losses' nonlinear parts matter
    auto = transformers.AutoModelForCausalLM
    trainer = trl_trainer(tmp_path, auto.from_pretrained(policy_dir), auto.from_pretrained(reference_dir),
                          beta=beta, loss_type=[loss])
    triples = token_triples()
    objective = DPOObjective(PreferenceLoss(beta, loss), FrozenReference(as_scorer(load_model(reference_dir))))
    ours = our_step(as_scorer(load_model(policy_dir)), objective, triples)
    theirs = trl_step(trainer, triples)
    assert 0 < theirs[1]["rewards/accuracies"] < 1 and abs(theirs[1]["rewards/margins"]) > 1e-3
    assert_same(ours, theirs)


def test_label_smoothing_is_conservative_dpo(llama_dirs, tmp_path):
    """cDPO: (1 - e) x DPO on the pairs + e x DPO on the pairs flipped, TRL's sigmoid loss each way (TRL 1.x keeps
    label smoothing for its robust / EXO losses, not this one)."""
    policy_dir, reference_dir = llama_dirs
    e, auto = 0.2, transformers.AutoModelForCausalLM
    trainer = trl_trainer(tmp_path, auto.from_pretrained(policy_dir), auto.from_pretrained(reference_dir), beta=2.0)
    triples = token_triples()
    straight, flipped = trl_step(trainer, triples), trl_step(trainer, [(p, r, c) for p, c, r in triples])
    objective = DPOObjective(PreferenceLoss(2.0, "sigmoid", e), FrozenReference(as_scorer(load_model(reference_dir))))
    loss, metrics, grads = our_step(as_scorer(load_model(policy_dir)), objective, triples)
    torch.testing.assert_close(loss, (1 - e) * straight[0] + e * flipped[0], rtol=1e-5, atol=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(straight[1]["rewards/margins"], rel=1e-5, abs=1e-5)
    for k, g in straight[2].items():
        torch.testing.assert_close(grads[k], (1 - e) * g + e * flipped[2][k], rtol=1e-5, atol=1e-5, msg=k)


def test_lora_equals_trl_with_peft(llama_dirs, tmp_path):
    """A LoRA policy (q_proj, v_proj; nonzero B) against the base with its adapters disabled, both ways."""
    peft = pytest.importorskip("peft")
    _, base_dir = llama_dirs
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    trainer = trl_trainer(tmp_path, transformers.AutoModelForCausalLM.from_pretrained(base_dir), peft_config=config,
                          beta=2.0)
    randomize_lora(trainer.model)
    policy = as_scorer(load_model(base_dir))
    apply_lora(policy, r=4, alpha=8, targets=["q_proj", "v_proj"])
    peft_state = peft.get_peft_model_state_dict(trainer.model)
    set_lora_state_dict(policy, {k.removeprefix("base_model.model."): v for k, v in peft_state.items()})
    triples = token_triples()
    ours = our_step(policy, DPOObjective(PreferenceLoss(2.0), base_reference), triples)
    theirs = trl_step(trainer, triples)
    assert abs(theirs[1]["rewards/margins"]) > 1e-3
    assert_same(ours, theirs)
    assert set(ours[2]) == set(lora_state_dict(policy))


# ---- pair formats ----------------------------------------------------------------------------------------------------
def test_llama_factory_sharegpt_demo_pairs(shared_corpora):
    """The bundled LLaMA-Factory pairs (dpo_zh_demo.json: sharegpt objects with a system turn in some): all 300
    read, each field where it belongs."""
    source = shared_corpora / "dpo" / "dpo_zh_demo.json"
    records, tally = json.loads(source.read_text()), Tally()
    pairs = read_pairs(source, tally)
    assert len(pairs) == len(records) == tally.read == 300 and not tally.dropped
    for pair, record in zip(pairs, records):
        turns = {t["from"]: t["value"] for t in record["conversations"]}
        assert (pair.prompt, pair.system, pair.history) == (turns["human"], turns.get("system", ""), [])
        assert (pair.chosen, pair.rejected) == (record["chosen"]["value"], record["rejected"]["value"])
    assert sum(bool(p.system) for p in pairs) == 64


def test_demo_pairs_through_a_real_chat_template(shared_corpora):
    """Qwen2's tokenizer and ChatML on the real pairs: the prompt holds the system turn and ends with the assistant's
    prefix, each answer ends with <|im_end|>, and both answers follow the same prompt tokens."""
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.load(shared_corpora / "tokenizers" / "qwen2")
    pairs = [p for p in read_pairs(shared_corpora / "dpo" / "dpo_zh_demo.json") if p.system][:8]
    examples = tokenize_pairs(pairs, tok, "chatml", max_seq_len=4096)
    im_end = tok.token_to_id("<|im_end|>")
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = examples.pair(i)
        text = tok.decode(prompt.tolist(), skip_special_tokens=False)
        assert text.startswith(f"<|im_start|>system\n{pair.system}") and text.endswith("<|im_start|>assistant\n")
        assert chosen[-1] == rejected[-1] == im_end
        assert tok.decode(chosen[:-1].tolist()) == pair.chosen and tok.decode(rejected[:-1].tolist()) == pair.rejected


FORMATS = {
    "sharegpt_strings": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"},
                                           {"from": "gpt", "value": "a1"}, {"from": "human", "value": "Q"}],
                         "chosen": "good", "rejected": "bad"},
    "alpaca": {"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad", "history": [["q1", "a1"]],
               "system": "S"},
    "trl_strings": {"prompt": "Q", "chosen": "good", "rejected": "bad"},
    "trl_messages": {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Q"}],
                     "chosen": [{"role": "assistant", "content": "good"}],
                     "rejected": [{"role": "assistant", "content": "bad"}]},
    "question": {"question": "Q", "response_chosen": "good", "response_rejected": "bad"},
    "minimind": {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                            {"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
}
WITH_HISTORY = {"sharegpt_strings", "alpaca", "trl_messages", "minimind"}
WITH_SYSTEM = {"sharegpt_strings", "alpaca", "trl_messages"}


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("lines", [False, True])
def test_every_pair_format_from_json_and_json_lines(tmp_path, name, lines):
    obj = FORMATS[name]
    path = tmp_path / ("pairs.jsonl" if lines else "pairs.json")
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n" if lines else json.dumps([obj, obj]))
    pairs = read_pairs(path)
    assert len(pairs) == (1 if lines else 2)
    pair = pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "good", "bad")
    assert pair.history == ([("q1", "a1")] if name in WITH_HISTORY else [])
    assert pair.system == ("S" if name in WITH_SYSTEM else "")


def test_bad_pairs_are_dropped_and_counted_and_parquet_round_trips(tmp_path):
    good = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    bad = [{"prompt": "Q", "chosen": "same", "rejected": " same "},
           {"prompt": "Q", "chosen": "good", "rejected": ""},
           {"question": "Q", "response_chosen": "   ", "response_rejected": "x"},
           {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]},
           {"text": "no pair here"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in [good, *bad]) + "{not json\n")
    tally = Tally()
    assert len(read_pairs(path, tally)) == 1
    assert dict(tally.dropped) == {"same_answers": 1, "empty_answer": 2, "prompts_differ": 1, "unknown_format": 1,
                                   "bad_json": 1}

    pairs = [Pair("Q", "good", "bad", "t", [("q1", "a1")], "S"), Pair("Q2", "g", "b", "t")]
    write_pairs(pairs, tmp_path / "pairs.parquet")
    assert pq.read_schema(tmp_path / "pairs.parquet").names == ["prompt", "chosen", "rejected", "source", "history",
                                                                 "system"]
    assert read_pairs(tmp_path / "pairs.parquet") == pairs
    stats = write_pair_shards(path, tmp_path / "prepared", valid_fraction=0)
    assert stats["train"] == 1 and stats["dropped"]["same_answers"] == 1
    train, valid, _ = pair_splits(tmp_path / "prepared", None, 0.5, 0)  # the shards' split, not a new one
    assert len(train) == 1 and not valid


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"} for i in range(40)]))
    train, valid, _ = pair_splits(path, None, 0.1, seed=3)
    assert len(valid) == 4 and len(train) == 36 and not {p.prompt for p in train} & {p.prompt for p in valid}
    assert pair_splits(path, None, 0.1, seed=3)[1] == valid != pair_splits(path, None, 0.1, seed=4)[1]
    with pytest.raises(ValueError, match="no usable preference pairs"):
        (tmp_path / "none.json").write_text(json.dumps([{"prompt": "Q", "chosen": "a", "rejected": "a"}]))
        pair_splits(tmp_path / "none.json", None, 0.1, 0)


# ---- rows, masks, log-probabilities ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny random model directory with its tokenizer, a preference-pair file on the same Q&A)."""
    from utils.tokenizer import Tokenizer, train_tokenizer
    root = tmp_path_factory.mktemp("tiny")
    (root / "data").mkdir()
    write_split(root / "data" / "train-00000.parquet",
                [(f"{q}（第{i}问）", f"{a}补充说明{i}：{a[::-1]}") for i in range(40) for q, a in QA])
    train_tokenizer(root / "data", 600, root / "tok")
    tok = Tokenizer.load(root / "tok")
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)),
               root / "init", tokenizer=tok)
    pairs = [{"conversations": [{"from": "human", "value": f"{q}（第{i}问）"}], "chosen": {"value": a},
              "rejected": {"value": a[::-1] + "不知道"}} for i in range(8) for q, a in QA]
    (root / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))
    return root / "init", root / "pairs.json"


def test_only_the_last_answer_and_its_end_of_turn_token_are_scored(tiny):
    """ChatML: labels cover the final answer and <|im_end|>, never the system, the history (its answer included) or
    the question; the text after the answer is not in the row. wenda (no end-of-turn token): eos ends the answer."""
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny[0])
    pair = Pair("长城有多长？", "两万公里。", "不知道。", history=[("你好", "你好！")], system="简短回答")
    for template, end in (("chatml", tok.token_to_id("<|im_end|>")), ("wenda", tok.eos_id)):
        loader = pair_loader([pair], tok, template, max_seq_len=256, batch_size=1)
        (batch,) = loader.eval_batches()
        ids, labels, seq = batch["input_ids"][0], batch["labels"][0], batch["sequence_ids"][0]
        for side, answer in enumerate((pair.chosen, pair.rejected)):
            scored = labels[(labels != IGNORE_INDEX) & (seq == side)].tolist()
            assert scored[-1] == end and tok.decode(scored[:-1]) == answer
        segment = batch["segment_ids"][0]
        rejected_inputs = ids[segment == 1].tolist()
        assert tok.decode(rejected_inputs + [end], skip_special_tokens=False).endswith(pair.rejected + tok.decode(
            [end], skip_special_tokens=False))  # the row's sequence stops at the end-of-turn token


def test_sequence_log_probs_sum_answer_tokens_only(tiny):
    """Each answer's log-probability from one packed forward equals the sum, over its tokens alone, of log-softmax
    from a plain forward of that sequence by itself; the prompt's tokens contribute nothing (changing them changes
    the sum only through the context)."""
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny[0])
    pairs = read_pairs(tiny[1])[:5]
    loader = pair_loader(pairs, tok, "chatml", max_seq_len=64, batch_size=8)
    (batch,) = loader.eval_batches()
    model = load_model(tiny[0]).eval()
    with torch.no_grad():
        packed = sequence_log_probs(as_scorer(load_model(tiny[0])), batch).view(-1, 2)
        for p, item in enumerate(batch["pair_ids"].tolist()):
            prompt, *answers = loader.examples.pair(item)
            for side, answer in enumerate(answers):
                x = torch.tensor([*prompt, *answer])
                logp = model(x[None, :-1])[0].log_softmax(-1).gather(-1, x[1:, None])[:, 0]
                assert packed[p, side].item() == pytest.approx(logp[len(prompt) - 1:].sum().item(), abs=1e-4)
                assert logp[:len(prompt) - 1].sum().abs() > 1  # what the packed sum leaves out is not nothing


def test_pairs_stay_side_by_side_and_long_ones_are_cut_or_skipped(tiny):
    from utils.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny[0])
    pairs = read_pairs(tiny[1])
    loader = pair_loader(pairs, tok, "chatml", max_seq_len=42, batch_size=3, seed=1)
    assert loader.examples.stats["truncated"] > 0
    for batch, _ in zip(loader, range(5)):
        seq, seg, labels = batch["sequence_ids"], batch["segment_ids"], batch["labels"]
        for s in range(2 * len(batch["pair_ids"])):
            rows, = torch.where(((seq == s) & (labels != IGNORE_INDEX)).any(1))
            assert len(rows) == 1  # one row holds a sequence, and its partner right after it
            partner = s + 1 if s % 2 == 0 else s - 1
            assert ((seq[rows[0]] == partner) & (labels[rows[0]] != IGNORE_INDEX)).any()
        assert (seg.max(1).values % 2 == 1).all()  # whole pairs per row: segments 0 .. 2k - 1
    skipped = pair_loader(pairs, tok, "chatml", max_seq_len=42, batch_size=3, skip_overlength=True)
    assert skipped.examples.stats["skipped_overlength"] == loader.examples.stats["truncated"]
    assert len(skipped.examples) == len(pairs) - skipped.examples.stats["skipped_overlength"]


# ---- `train.py dpo`: the loop, its log, resume, stops ----------------------------------------------------------------
def dpo_args(tiny, out: Path, *extra: str, model: tuple[str, ...] | None = None) -> list[str]:
    init, pairs = tiny
    return ["dpo", *(model or ("--init", str(init))), "--data", str(pairs), "--max-seq-length", "48", "--batch-size",
            "2", "--warmup-steps", "1", "--lr", "1e-3", "--log-every", "1", "--cpu", "--mixed-precision", "no",
            "--out", str(out), *extra]


def test_trl_metrics_go_to_the_log_and_tensorboard_for_train_and_valid(tiny, tmp_path, monkeypatch):
    """Before the first step the policy is the reference (loss log 2, rewards 0) and the sample answers are printed;
    every step logs TRL's metrics, every evaluation the same on the valid split, and both reach TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trainer.stages
    run = tmp_path / "run"
    monkeypatch.setattr(trainer.stages, "DEFAULT_SAMPLE_PROMPTS", ["什么是机器学习？"])  # one answer to generate
    train.main(dpo_args(tiny, run, "--max-steps", "4", "--eval-every", "2", "--valid-fraction", "0.25"))
    log = (run / "train.log").read_text()
    assert "pairs: {'read': 48, 'dropped': {}, 'train': 36, 'valid': 12}" in log
    assert ("eval step 0: loss 0.6931 rewards/chosen 0.0000 rewards/rejected 0.0000 rewards/margins 0.0000 "
            "rewards/accuracies 0.0000 logps/chosen -") in log
    steps = re.findall(r"step (\d+) loss \S+ lr .* rewards/chosen \S+ rewards/rejected \S+ rewards/margins \S+ "
                       r"rewards/accuracies \S+ logps/chosen \S+ logps/rejected \S+", log)
    assert steps == ["1", "2", "3", "4"]
    assert [int(s) for s in re.findall(r"eval step (\d+): loss", log)] == [0, 2, 4]
    assert log.count("sample: 什么是机器学习？ -> ") == 3
    final = float(re.search(r"eval step 4: .*rewards/margins (\S+)", log).group(1))
    assert final > 0.1  # the reversed, 不知道-ending answers are easy to tell apart
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for split in ("train", "eval"):
        assert {f"{split}/loss", *(f"{split}/{k}" for k in STATS)} <= tags, tags
    assert len(events.Scalars("train/rewards/accuracies")) == 4 and len(events.Scalars("eval/loss")) == 3


def weights_of(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run / "latest" / name)


def test_resumed_dpo_run_equals_a_straight_one(tiny, tmp_path):
    """4 straight steps == 2 steps + --resume to 4, bitwise (every weight trains; a frozen copy is the reference)."""
    quiet = ("--valid-fraction", "0")
    train.main(dpo_args(tiny, tmp_path / "a", "--max-steps", "4", *quiet))
    train.main(dpo_args(tiny, tmp_path / "b", "--max-steps", "2", *quiet))
    train.main(dpo_args(tiny, tmp_path / "b", "--max-steps", "4", "--resume", *quiet))
    a, b = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in load_model(tiny[0]).state_dict().items() if k in a)


def test_lora_dpo_with_precomputed_reference_resumes_exactly(tiny, tmp_path):
    """--base --lora with adapter dropout (random draws to restore) and --precompute-ref: 2 + resume == 4 straight,
    bitwise, and the same adapter (to float rounding) as a run scoring the reference batch by batch."""
    lora = ("--base", str(tiny[0]), "--lora", "--r", "4", "--targets", "q_proj,v_proj", "--dropout", "0.1")
    quiet = ("--valid-fraction", "0")
    train.main(dpo_args(tiny, tmp_path / "a", "--max-steps", "4", "--precompute-ref", *quiet, model=lora))
    train.main(dpo_args(tiny, tmp_path / "b", "--max-steps", "2", "--precompute-ref", *quiet, model=lora))
    train.main(dpo_args(tiny, tmp_path / "b", "--max-steps", "4", "--precompute-ref", "--resume", *quiet, model=lora))
    train.main(dpo_args(tiny, tmp_path / "c", "--max-steps", "4", *quiet, model=lora))
    a, b, c = (weights_of(tmp_path / r, "adapter_model.safetensors") for r in "abc")
    assert a.keys() == b.keys() == c.keys() and any("lora_B" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    assert "precomputed for 48 pairs" in (tmp_path / "a" / "train.log").read_text()


def test_accumulation_weights_pairs_not_micro_batches(tiny, tmp_path):
    """Rows hold different numbers of pairs: batch 1 x accumulation 2 equals batch 2 x accumulation 1 (one
    pair-weighted mean over the window, not a mean of the micro-batches' means)."""
    from utils.tokenizer import Tokenizer
    pairs = [Pair(q, a[:2 + (i * 7) % len(a)], a[::-1][:2 + (i * 5) % len(a)]) for i, (q, a) in enumerate(QA * 8)]
    write_pairs(pairs, tmp_path / "pairs.parquet")

    def uneven(seed: int) -> bool:  # both steps' two rows hold different numbers of pairs
        batches = iter(pair_loader(pairs, Tokenizer.load(tiny[0]), max_seq_len=56, batch_size=2, seed=seed))
        return all(len(set(((next(batches)["segment_ids"].max(1).values + 1) // 2).tolist())) == 2 for _ in "ab")
    seed = next(s for s in range(50) if uneven(s))  # the comparison is meaningful
    for name, batch, accum in (("b2", "2", "1"), ("b1", "1", "2")):
        args = dpo_args(tiny, tmp_path / name, "--max-steps", "2", "--valid-fraction", "0", "--max-seq-length", "56",
                        "--seed", str(seed), "--batch-size", batch, "--grad-accum", accum)
        train.main([a if a != str(tiny[1]) else str(tmp_path / "pairs.parquet") for a in args])
    a, b, init = weights_of(tmp_path / "b2"), weights_of(tmp_path / "b1"), load_model(tiny[0]).state_dict()
    moved = sum((a[k] - init[k]).abs().sum() for k in a)
    assert sum((a[k] - b[k]).abs().sum() for k in a) / moved < 1e-4


def test_a_non_finite_loss_stops_naming_the_step(tiny, tmp_path, monkeypatch):
    from trainer.loop import NonFiniteLoss
    run = tmp_path / "run"
    train.main(dpo_args(tiny, run, "--max-steps", "2", "--valid-fraction", "0"))
    original, calls = PreferenceLoss.__call__, {"n": 0}

    def nan_at_the_second_step(self, *args):
        calls["n"] += 1
        losses, rewards = original(self, *args)
        return (losses * float("nan") if calls["n"] == 2 else losses), rewards
    monkeypatch.setattr(PreferenceLoss, "__call__", nan_at_the_second_step)
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        train.main(dpo_args(tiny, run, "--max-steps", "6", "--resume", "--valid-fraction", "0"))
    assert os.readlink(run / "latest") == "checkpoint-2"


def test_another_reference_and_settings_checked_before_any_work(tiny, tmp_path):
    """--ref: the reference is that model, so before any step the rewards are already not 0. Wrong combinations of
    model options and losses are refused at once."""
    from trainer.config import DPOConfig
    from trainer.stages import dpo
    from utils.tokenizer import Tokenizer
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_model(Transformer(load_model(tiny[0]).config), other, tokenizer=Tokenizer.load(tiny[0]))
    dpo(DPOConfig(init=str(tiny[0]), ref=str(other), data=str(tiny[1]), max_seq_length=48, max_steps=1, cpu=True,
                  mixed_precision="no", out_dir=str(tmp_path / "run"), sample_prompts=["你好"]))
    margin = float(re.search(r"eval step 0: .*rewards/margins (\S+)", (tmp_path / "run" / "train.log").read_text())[1])
    assert margin != 0
    for wrong in (dict(base="b"), dict(init="a", base="b", lora=True), dict(lora=True, init="a"),
                  dict(base="b", lora=True, ref="r")):
        with pytest.raises(ValueError, match="--init|--ref"):
            DPOConfig(data="d", **wrong)
    with pytest.raises(ValueError, match="label smoothing is for the sigmoid loss"):
        PreferenceLoss(loss="hinge", label_smoothing=0.1)
    assert math.isclose(PreferenceLoss().beta, 0.1)


# ---- real data, demo-sized model -------------------------------------------------------------------------------------
def answer_loss(model_dir: Path, data: Path) -> float:
    """Mean answer-token loss over a prepared SFT train split (what the SFT model learned)."""
    from trainer.data import sft_loader
    from utils.tokenizer import Tokenizer
    model = load_model(model_dir).eval()
    loader = sft_loader(data, Tokenizer.load(model_dir), "chatml", max_seq_len=256, batch_size=8)
    total = tokens = 0
    with torch.no_grad():
        for batch in loader.eval_batches(max_rows=160):
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += model(batch["input_ids"], batch["labels"], segment_ids=batch["segment_ids"]).item() * n
            tokens += n
    return total / tokens


@pytest.mark.slow
def test_dpo_on_the_demo_model_learns_the_bundled_preferences(shared_corpora, demo, tmp_path):
    """DPO on the demo's model (`train.py demo`: bundled samples -> tokenizer -> tiny pretrain -> ChatML SFT) with the
    bundled LLaMA-Factory pairs (40 steps, less than the demo's SFT): on the held-out pairs the accuracy rises from 0
    above 0.5 and the loss falls below log 2, while the SFT answers' loss barely moves (the answers do not turn to
    garbage); the sample answers stand in the log before and after."""
    from trainer.config import DPOConfig
    from trainer.demo import DEMO_QUESTIONS
    from trainer.stages import dpo
    demo_out = demo[0]
    data, sft_model = demo_out / "data", demo_out / "sft" / "latest"
    run = tmp_path / "dpo"
    dpo(DPOConfig(init=str(sft_model), data=str(shared_corpora / "dpo" / "dpo_zh_demo.json"), max_seq_length=192,
                  batch_size=8, max_steps=40, lr=5e-5, warmup_steps=5, eval_every=20, valid_fraction=0.15,
                  out_dir=str(run), sample_prompts=DEMO_QUESTIONS[:2], cpu=True, mixed_precision="no", log_every=10,
                  save_total_limit=1, eval_batches=50))
    log = (run / "train.log").read_text()
    evals = {int(step): (float(loss), float(acc)) for step, loss, acc in
             re.findall(r"eval step (\d+): loss (\S+) .*rewards/accuracies (\S+)", log)}
    assert evals[0] == (pytest.approx(math.log(2), abs=1e-4), 0.0)
    assert evals[40][1] > 0.5 and evals[40][0] < math.log(2), evals
    assert log.count(f"sample: {DEMO_QUESTIONS[0]} -> ") == 3  # before, halfway, after
    before, after = answer_loss(sft_model, data), answer_loss(run / "latest", data)
    assert after < before * 1.05, (before, after)
