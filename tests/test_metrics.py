"""Evaluation: character-level BLEU-4 / ROUGE-L against hand-worked examples and independent implementations, and
`train.py eval` end to end on a tiny model that was trained for a few steps on the eval questions (so its greedy
answers stop at different lengths and partly match the references)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import train
from model import ModelConfig, Transformer, load_model, save_model
from model.generation import SamplingConfig, chat_prompt, default_stop_ids, generate
from utils.cleaning import text_of
from utils.metrics import answer_loss, bleu4, char_tokens, evaluate, rouge_l
from utils.templates import get_template, to_messages, tokenize_sft
from utils.tokenizer import Tokenizer, train_tokenizer

# ---- hand-worked metrics -------------------------------------------------------------------------------------------
PREDICTIONS = ["今天天气不错", "我喜欢Python"]
REFERENCES = ["今天天气很好", "我很喜欢Python编程"]


def test_char_tokens_split_characters_and_keep_ascii_words():
    assert char_tokens("我喜欢Python 3编程！") == ["我", "喜", "欢", "Python", "3", "编", "程", "！"]
    assert char_tokens("  a b\n") == ["a", "b"]  # whitespace only separates
    assert char_tokens("") == []


def test_bleu4_hand_worked():
    """Corpus BLEU-4 of PREDICTIONS against REFERENCES, by hand.

    Tokens: 今 天 天 气 不 错 (6) vs 今 天 天 气 很 好 (6); 我 喜 欢 Python (4) vs 我 很 喜 欢 Python 编 程 (7).
    Clipped n-gram matches / candidate n-grams, sentence 1 + sentence 2:
      1-grams: 今 天 天 气 = 4/6  + 我 喜 欢 Python = 4/4             -> p1 = 8/10
      2-grams: 今天 天天 天气 = 3/5  + 喜欢 欢Python = 2/3               -> p2 = 5/8
      3-grams: 今天天 天天气 = 2/4  + 喜欢Python = 1/2                   -> p3 = 3/6
      4-grams: 今天天气 = 1/3        + (我喜欢Python not in ref) 0/1      -> p4 = 1/4
    Geometric mean (0.8 * 0.625 * 0.5 * 0.25) ** (1/4) = 0.0625 ** 0.25 = 0.5.
    Brevity penalty: c = 10 candidate tokens, r = 13 reference tokens, BP = exp(1 - 13/10) = exp(-0.3) = 0.7408.
    BLEU-4 = 0.5 * 0.7408 = 0.37041 -> 37.04.
    """
    result = bleu4(PREDICTIONS, REFERENCES)
    assert result["bleu_precisions"] == pytest.approx([80.0, 62.5, 50.0, 25.0])
    assert result["brevity_penalty"] == pytest.approx(math.exp(-0.3))
    assert (result["prediction_tokens"], result["reference_tokens"]) == (10, 13)
    assert result["bleu4"] == pytest.approx(100 * 0.5 * math.exp(-0.3))
    # sentence 1 alone: p = 4/6, 3/5, 2/4, 1/3, BP = 1 -> (1/15) ** (1/4)
    assert bleu4(PREDICTIONS[:1], REFERENCES[:1])["bleu4"] == pytest.approx(100 * (1 / 15) ** 0.25)


def test_rouge_l_hand_worked():
    """Mean sentence ROUGE-L F1, by hand.

    Sentence 1: LCS(今天天气不错, 今天天气很好) = 今天天气 = 4; P = 4/6, R = 4/6, F = 2PR / (P + R) = 2/3.
    Sentence 2: LCS(我 喜 欢 Python, 我 很 喜 欢 Python 编 程) = 我 喜 欢 Python = 4; P = 4/4 = 1, R = 4/7,
                F = 2 * 1 * 4/7 / (1 + 4/7) = 8/11.
    Mean F = (2/3 + 8/11) / 2 = 23/33 = 0.69697 -> 69.70; mean P = (2/3 + 1) / 2; mean R = (2/3 + 4/7) / 2.
    """
    result = rouge_l(PREDICTIONS, REFERENCES)
    assert result["rouge_l_f"] == pytest.approx(100 * 23 / 33)
    assert result["rouge_l_p"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert result["rouge_l_r"] == pytest.approx(100 * (2 / 3 + 4 / 7) / 2)


def test_edge_cases():
    assert bleu4(["天气很好"], ["天气很好"])["bleu4"] == pytest.approx(100)
    assert rouge_l(["天气很好"], ["天气很好"])["rouge_l_f"] == pytest.approx(100)
    assert bleu4([""], ["天气很好"])["bleu4"] == 0.0  # an empty answer: BP = 0
    assert rouge_l([""], ["天气很好"])["rouge_l_f"] == 0.0
    with pytest.raises(ValueError):
        rouge_l(["a"], ["a", "b"])


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
    return row[-1]


def _perturbed_pairs(texts: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(prediction, reference): each prediction drops, repeats and swaps some characters of its reference."""
    rng = random.Random(seed)
    preds = []
    for t in texts:
        chars = [c for c in t if rng.random() > 0.15]
        for _ in range(len(chars) // 10):
            i, j = rng.randrange(len(chars)), rng.randrange(len(chars))
            chars[i], chars[j] = chars[j], chars[i]
        preds.append("".join(chars[: rng.randint(len(chars) // 2, len(chars))]))
    return preds, texts


def test_metrics_match_nltk_and_plain_lcs_on_real_answers(shared_corpora):
    """On real BELLE answers (Chinese with digits, English words and punctuation): our corpus BLEU-4 equals nltk's
    corpus_bleu on the same tokens, and ROUGE-L equals a plain dynamic-programming LCS."""
    from nltk.translate.bleu_score import corpus_bleu

    lines = (shared_corpora / "belle" / "dev1K.first800.json").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["output"] for line in lines[:60]]
    preds, refs = _perturbed_pairs(answers)
    ours = bleu4(preds, refs)
    reference = corpus_bleu([[char_tokens(r)] for r in refs], [char_tokens(p) for p in preds])
    assert 5 < ours["bleu4"] < 95
    assert ours["bleu4"] == pytest.approx(100 * reference, rel=1e-9)

    fs = []
    for p, r in zip(preds, refs):
        pt, rt = char_tokens(p), char_tokens(r)
        lcs = _lcs(pt, rt)
        fs.append(0.0 if lcs == 0 else 2 * lcs / (len(pt) + len(rt)))  # F1 = 2PR/(P+R) = 2 LCS/(|p| + |r|)
    assert rouge_l(preds, refs)["rouge_l_f"] == pytest.approx(100 * sum(fs) / len(fs), rel=1e-9)


# ---- a tiny chat model and a test split ----------------------------------------------------------------------------
QA = [("今天天气怎么样？", "今天天气很好，适合出去散步。"),
      ("什么是机器学习？", "机器学习是人工智能的一个分支，让计算机从数据中学习规律。"),
      ("推荐一本书。", "我推荐《三体》，这是一部很好看的科幻小说。"),
      ("怎么学习Python？", "先学基础语法，再多写小程序练习。"),
      ("感冒了怎么办？", "多喝水，注意休息，如果发烧要去看医生。"),
      ("北京有什么好玩的地方？", "可以去故宫、长城和颐和园看看。"),
      ("如何提高睡眠质量？", "睡前少看手机，保持规律的作息时间。"),
      ("1加1等于几？", "1加1等于2。"),
      ("你好", ""),  # an empty answer: only its end-of-turn token is scored, no characters
      ]
LONG = ("请详细介绍一下中国的历史。" * 8, "中国有五千年的历史。")  # longer than the 64-token context window
CONTEXT = 64
MAX_NEW = 24


def _train_briefly(model: Transformer, tok: Tokenizer, steps: int = 60) -> None:
    """Full-batch SFT steps on QA until the answers are mostly memorized: greedy answers then stop at different
    lengths (some run into --max-new-tokens), and high BLEU shows that generation prompts match the trained format."""
    examples = tokenize_sft([to_messages(r) for r in QA], tok, get_template("chatml"), CONTEXT)
    longest = max(len(examples.example(e)[0]) for e in range(len(examples))) - 1
    x = torch.full((len(examples), longest), tok.pad_id)
    y = torch.full((len(examples), longest), -100)
    for e in range(len(examples)):
        ids, mask = (torch.from_numpy(a.astype("int64")) for a in examples.example(e))
        x[e, :len(ids) - 1] = ids[:-1]
        y[e, :len(ids) - 1] = ids[1:].masked_fill(~mask[1:].bool(), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread, and much faster on a busy machine
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    (root / "text.txt").write_text("\n".join(f"{q}\n{a}" for q, a in QA) * 5, encoding="utf-8")
    train_tokenizer([root / "text.txt"], 400, root / "tok", template="chatml", show_progress=False)
    tok = Tokenizer.load(root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                    max_position_embeddings=CONTEXT, tie_word_embeddings=False))
    _train_briefly(model, tok)
    save_model(model, root / "model", tokenizer=tok)
    rows = [{"prompt": q, "response": a, "source": "qa"} for q, a in QA]
    rows.insert(3, {"prompt": LONG[0], "response": LONG[1], "source": "long"})
    rows.insert(5, {"prompt": None, "response": "空", "source": "null"})
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000.parquet")
    return root


def run_eval(workdir: Path, *flags: str) -> dict:
    out = workdir / "eval.json"
    train.main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data" / "test-00000.parquet"),
                "--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--batch-size", "4", "--no-progress",
                "--out", str(out), *flags])
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def report(workdir) -> dict:
    return run_eval(workdir)


def test_eval_cli_report_fields_and_counts(report, workdir):
    assert report["model"] == str(workdir / "model") and report["template"] == "chatml"
    assert report["skipped_null"] == 1 and report["examples"] == len(QA) + 1
    assert report["loss_skipped_overlength"] == 1 and report["loss_examples"] == len(QA)
    assert report["generation_skipped_overlength"] == 1 and report["generated"] == len(QA)
    assert report["answer_chars"] == sum(len(a) for _, a in QA)
    assert 30 < report["bleu4"] < 100 and 30 < report["rouge_l_f"] < 100  # mostly memorized answers
    assert len(report["bleu_precisions"]) == 4 and 0 < report["brevity_penalty"] <= 1
    assert report["sampling"]["temperature"] == 0.0 and report["sampling"]["max_new_tokens"] == MAX_NEW
    assert len(report["samples"]) == 5 and "predictions" not in report
    first = report["samples"][0]
    assert (first["prompt"], first["reference"]) == QA[0] and isinstance(first["prediction"], str)
    assert (report["device"], report["dtype"]) == ("cpu", "float32")


def test_loss_perplexity_and_bits_per_char_are_consistent(report):
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
    nats = report["loss"] * report["answer_tokens"]
    assert report["bits_per_char"] == pytest.approx(nats / math.log(2) / report["answer_chars"], rel=1e-12)


def test_loss_equals_transformers_per_example(report, workdir):
    """The answer loss recomputed independently: each record on its own (no batching, no padding) through
    transformers' LlamaForCausalLM on the saved model dir, prompt ids from the chat prompt builder, answer ids
    encoded as the ChatML answer piece (answer + <|im_end|>)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(workdir / "model", torch_dtype=torch.float32).eval()
    tok = Tokenizer.load(workdir / "model")
    nats, count = 0.0, 0
    for q, a in QA:
        prompt = chat_prompt(tok, [{"role": "user", "content": q}], "chatml")
        answer = tok.encode(a + "<|im_end|>")
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
        nats += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
        count += len(answer)
    assert report["answer_tokens"] == count
    assert report["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert report["bits_per_char"] == pytest.approx(nats / math.log(2) / sum(len(a) for _, a in QA), rel=1e-5)


def test_batched_generation_equals_one_at_a_time(workdir):
    model, tok = load_model(workdir / "model"), Tokenizer.load(workdir / "model")
    records = [{"prompt": q, "response": a} for q, a in QA] + [{"prompt": LONG[0], "response": LONG[1]}]
    result = evaluate(model, tok, records, sampling=SamplingConfig(max_new_tokens=MAX_NEW), batch_size=4,
                      progress=False)
    config = SamplingConfig(max_new_tokens=MAX_NEW, stop_ids=default_stop_ids(tok, "chatml"))
    single, lengths, marked = [], [], []
    for q, _ in QA:
        (out,) = generate(model, [chat_prompt(tok, [{"role": "user", "content": q}], "chatml")], config)
        single.append(tok.decode(out, skip_special_tokens=True, errors="ignore"))
        marked.append(tok.decode(out, skip_special_tokens=True))
        lengths.append(len(out))
    assert result["predictions"] == single + [None]  # the over-long prompt is skipped
    # an answer cut at the length limit inside a character: its last bytes are dropped, not shown as U+FFFD
    assert not any("\ufffd" in p for p in single) and any("\ufffd" in p for p in marked)
    # rows stopped at different steps inside the batches, some at the end-of-turn token, some at the length limit
    assert len(set(lengths)) > 2 and min(lengths) < MAX_NEW == max(lengths)
    assert result["bleu4"] == pytest.approx(bleu4(single, [a for _, a in QA])["bleu4"])


def test_loss_batching_does_not_change_the_loss(workdir):
    model, tok = load_model(workdir / "model"), Tokenizer.load(workdir / "model")
    records = [{"prompt": q, "response": a} for q, a in QA]
    one_per_batch = answer_loss(model, tok, records, get_template("chatml"), batch_tokens=1, progress=False)
    all_at_once = answer_loss(model, tok, records, get_template("chatml"), batch_tokens=10_000, progress=False)
    assert one_per_batch["loss"] == pytest.approx(all_at_once["loss"], rel=1e-6)


def test_wenda_template_counts_answer_characters_not_eos(workdir):
    """wenda has no end-of-turn token in its text: eos is appended and scored, but adds no character."""
    model, tok = load_model(workdir / "model"), Tokenizer.load(workdir / "model")
    records = [{"prompt": q, "response": a} for q, a in QA]
    result = answer_loss(model, tok, records, get_template("wenda"), progress=False)
    assert result["answer_chars"] == sum(len(a) for _, a in QA)
    # the empty answer renders no answer piece under wenda (nothing to score, counted apart)
    assert (result["loss_examples"], result["loss_skipped_no_target"]) == (len(QA) - 1, 1)
    assert result["answer_tokens"] == sum(len(tok.encode(a)) + 1 for _, a in QA if a)


def test_eval_cli_prepared_dir_stdout_and_loss_only(workdir, capsys):
    train.main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data"), "--split", "test",
                "--device", "cpu", "--no-generate", "--no-progress", "--max-samples", "3", "--out", "-"])
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 3 and result["loss_examples"] == 3 and "bleu4" not in result
    assert result["data"] == [str(workdir / "data" / "test-00000.parquet")]


def test_eval_cli_default_out_beside_the_model(workdir):
    train.main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data" / "test-00000.parquet"),
                "--device", "cpu", "--no-generate", "--no-progress", "--max-samples", "2"])
    assert json.loads((workdir / "model" / "eval-test-00000.json").read_text())["examples"] == 2


def test_eval_cli_bad_data_is_a_clear_error(workdir, capsys):
    bad = workdir / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), bad)
    for data, message in ((bad, "missing column"), (workdir / "nope.parquet", "not found"),
                          (workdir / "text.txt", "parquet")):
        with pytest.raises(SystemExit):
            train.main(["eval", "--model", str(workdir / "model"), "--data", str(data), "--no-progress"])
        assert message in capsys.readouterr().err


def test_eval_cli_bpc_equals_transformers_per_document(workdir):
    """--task bpc: each record as the pretraining document `prompt\\nresponse` + eos after an eos (the tokenizer has
    no bos), longer ones scored in context-length windows; bits per character recomputed document by document
    through transformers' LlamaForCausalLM on the saved model dir."""
    transformers = pytest.importorskip("transformers")
    train.main(["eval", "--model", str(workdir / "model"), "--task", "bpc", "--data", str(workdir / "data"),
                "--device", "cpu", "--no-progress", "--loss-batch-tokens", "256"])
    report = json.loads((workdir / "model" / "eval-bpc-test.json").read_text(encoding="utf-8"))
    hf = transformers.LlamaForCausalLM.from_pretrained(workdir / "model", torch_dtype=torch.float32).eval()
    tok = Tokenizer.load(workdir / "model")
    docs = [text_of(q, a) for q, a in QA[:3] + [LONG] + QA[3:]]  # the file's order; the null row is skipped
    nats, count = 0.0, 0
    for doc in docs:
        seq = [tok.eos_id, *tok.encode(doc, special=False), tok.eos_id]
        for s in range(0, len(seq) - 1, CONTEXT):
            chunk = torch.tensor([seq[s:s + CONTEXT + 1]])
            with torch.no_grad():
                logits = hf(chunk[:, :-1]).logits[0].float()
            nats += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    assert (report["task"], report["documents"], report["skipped_null"]) == ("bpc", len(docs), 1)
    assert report["documents_split"] == 1 and report["document_tokens"] == count
    assert report["document_chars"] == sum(map(len, docs))
    assert report["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert report["bits_per_char"] == pytest.approx(nats / math.log(2) / sum(map(len, docs)), rel=1e-5)


def test_eval_cli_task_qa_is_the_default(workdir, capsys):
    flags = ["--model", str(workdir / "model"), "--data", str(workdir / "data"), "--device", "cpu", "--no-generate",
             "--no-progress", "--max-samples", "2", "--out", "-"]
    train.main(["eval", *flags])
    default = json.loads(capsys.readouterr().out)
    train.main(["eval", "--task", "qa", *flags])
    assert json.loads(capsys.readouterr().out)["loss"] == default["loss"]
    with pytest.raises(SystemExit):
        train.main(["eval", "--task", "qa", "--template", "none", *flags])
    assert "--template none" in capsys.readouterr().err
