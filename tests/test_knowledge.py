"""Knowledge benchmarks (utils/knowledge.py): the official prompt formats, option scores against independent
`transformers` computations on tiny random HF Llama / Qwen2 checkpoints (the official letter-logit method) and
against lm-evaluation-harness (loglik), the real CMMLU files, bad input, and `train.py eval --task`."""
from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import shared_dir

import train
from model import ModelConfig, Transformer
from model.chat import load_chat_model
from utils import knowledge as K
from utils.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- small benchmark directories, laid out as each benchmark ships -------------------------------------------------
CMMLU_ROWS = {
    "agronomy": [
        ("在农业生产中，最主要的不可替代的基本生产资料是", "农业生产工具", "土地", "劳动力", "资金", "B"),
        ("农业税的计税标准，按（）来进行", "当年产量", "三年平均产量", "常年产量", "去年产量", "C"),
        ("使用年限长，可以多次参加生产过程的资产属于", "有形资产", "流动资产", "无形资产", "固定资产", "D"),
        ("水稻原产于", "中国", "美洲", "欧洲", "非洲", "A"),
        ("小麦属于", "禾本科", "豆科", "茄科", "十字花科", "A"),
        ("下列作物中喜温的是", "玉米", "燕麦", "大麦", "油菜", "A"),
        ("土壤的基本肥力因素不包括", "水分", "养分", "空气", "光照", "D"),
        ("我国种植面积最大的粮食作物是", "水稻", "小麦", "玉米", "大豆", "C"),
        ("棉花属于", "纤维作物", "油料作物", "糖料作物", "饮料作物", "A"),
    ],
    "chinese_history": [
        ("秦朝统一六国是在公元前", "221年", "206年", "230年", "202年", "A"),
        ("唐朝的都城是", "洛阳", "长安", "开封", "南京", "B"),
        ("“贞观之治”出现在哪位皇帝时期", "唐高祖", "唐太宗", "唐玄宗", "唐高宗", "B"),
        ("郑和下西洋发生在", "元朝", "明朝", "清朝", "宋朝", "B"),
        ("中国第一个封建王朝是", "夏", "商", "周", "秦", "D"),
        ("辛亥革命爆发于", "1911年", "1912年", "1919年", "1921年", "A"),
        ("鸦片战争开始于", "1840年", "1856年", "1894年", "1900年", "A"),
        ("造纸术的改进者是", "蔡伦", "毕昇", "张衡", "祖冲之", "A"),
    ],
    "high_school_physics": [
        ("力的国际单位是", "焦耳", "牛顿", "瓦特", "帕斯卡", "B"),
        ("光在真空中的速度约为", "3×10^8 m/s", "3×10^6 m/s", "340 m/s", "1500 m/s", "A"),
        ("物体做自由落体运动时，加速度", "越来越大", "越来越小", "保持不变", "先增大后减小", "C"),
        ("电阻的单位是", "伏特", "安培", "欧姆", "库仑", "C"),
        ("下列属于矢量的是", "质量", "时间", "速度", "温度", "C"),
        ("一个物体静止在水平面上，它受到的重力与支持力是一对", "作用力与反作用力", "平衡力", "摩擦力",
         "合力", "B"),
        ("动能的表达式是", "mv", "mv²/2", "mgh", "Fs", "B"),
    ],
}
DEV = 5  # the first rows of each subject are its dev split, as CMMLU ships 5 dev questions a subject


def write_cmmlu(root: Path) -> Path:
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    for subject, rows in CMMLU_ROWS.items():
        for split, part in (("dev", rows[:DEV]), ("test", rows[DEV:] + rows[:1])):
            with (root / split / f"{subject}.csv").open("w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                w.writerows([i, *row] for i, row in enumerate(part))
    return root


def write_ceval(root: Path) -> Path:
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True)
    for subject, rows in (("high_school_physics", CMMLU_ROWS["high_school_physics"]),
                          ("modern_chinese_history", CMMLU_ROWS["chinese_history"])):
        for split, part in (("dev", rows[:DEV]), ("val", rows[DEV:]), ("test", rows[DEV:])):
            with (root / split / f"{subject}_{split}.csv").open("w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                header = ["id", "question", "A", "B", "C", "D"]
                if split != "test":  # C-Eval's test split ships without answers
                    header += ["answer"] + (["explanation"] if split == "dev" else [])
                w.writerow(header)
                for i, row in enumerate(part):
                    w.writerow([i, *row[:5]] + ([] if split == "test" else [row[5]])
                               + (["1. 因为……"] if split == "dev" else []))
    return root


GAOKAO_EXAMPLES = [
    {"year": "2010", "category": "（新课标）", "index": 0, "score": 4, "analysis": "…",
     "question": "1．（4分）西周分封制在中国历史上影响深远。下列省区中，其简称源\n自西周封国国名的是（　　）\n"
                 "A．河南、河北  B．湖南、湖北  C．山东、山西  D．广东、广西\n", "answer": ["C"]},
    {"year": "2010", "category": "（新课标）", "index": 1, "score": 4, "analysis": "…",
     "question": "2．（4分）郡县制为“公天下”之开端，主要体现在（　　）\nA．百姓不再是封君的属民  "
                 "B．更有利于皇帝集权\nC．制度法令的统一  D．依据才干政绩任免官吏\n", "answer": ["D"]},
    {"year": "2011", "category": "（新课标）", "index": 2, "score": 6, "analysis": "…",
     "question": "3．（6分）下列说法正确的是（　　）\nA．甲  B．乙  C．丙  D．丁\n", "answer": ["B", "D"]},
    {"year": "2011", "category": "（新课标）", "index": 3, "score": 4, "analysis": "…",
     "question": "4．（4分）材料反映的是（　　）\n没有可以找到的选项\n", "answer": ["A"]},
]


def write_gaokao(root: Path) -> Path:
    folder = root / "Objective_Questions"
    folder.mkdir(parents=True)
    (folder / "2010-2022_History_MCQs.json").write_text(
        json.dumps({"keywords": "2010-2022_History_MCQs", "example": GAOKAO_EXAMPLES}, ensure_ascii=False, indent=4),
        encoding="utf-8")
    (folder / "gemini-pro_2010-2022_History_MCQs.json").write_text("{}")  # a model's outputs beside: ignored
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bench")
    return SimpleNamespace(cmmlu=write_cmmlu(root / "cmmlu"), ceval=write_ceval(root / "ceval"),
                           gaokao=write_gaokao(root / "gaokao"), root=root)


# ---- tiny random HF checkpoints --------------------------------------------------------------------------------------
def save_hf(kind: str, vocab: int, path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024, rms_norm_eps=1e-6)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():  # large enough weights that the option scores differ clearly
            p.normal_(0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.float().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def our_tokenizer(data) -> Path:
    text = data.root / "text.txt"
    text.write_text("\n".join("".join(r[:5]) for rows in CMMLU_ROWS.values() for r in rows) * 3
                    + "以下是关于的单项选择题，请直接给出正确答案的选项。题目：答案是：ABCD", encoding="utf-8")
    out = data.root / "tok"
    train_tokenizer([text], 400, out, template="chatml", show_progress=False)
    return out


_MODEL_DIRS: dict[str, Path] = {}


def model_dir(kind: str, tmp_path_factory, our_tokenizer: Path) -> Path:
    """llama: an HF Llama with our byte-level BPE tokenizer; llama-sp: with the real LLaMA tokenizer.model (several
    ids decode to "A"); qwen2: an HF Qwen2 with the real Qwen2 tokenizer files. Made once per test session."""
    if kind not in _MODEL_DIRS:
        _MODEL_DIRS[kind] = _make_model_dir(kind, tmp_path_factory.mktemp(kind), our_tokenizer)
    return _MODEL_DIRS[kind]


def _make_model_dir(kind: str, path: Path, our_tokenizer: Path) -> Path:
    if kind == "llama":
        tok = Tokenizer.load(our_tokenizer)
        tok.save(path)
        return save_hf("llama", tok.vocab_size, path)
    tokenizers = shared_dir("corpora/tokenizers", "the real tokenizers")
    if kind == "llama-sp":
        shutil.copy(tokenizers / "llama" / "tokenizer.model", path / "tokenizer.model")
        (path / "tokenizer_config.json").write_text(json.dumps({  # Llama-2-7b-hf's
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}))
        return save_hf("llama", 32000, path)
    for f in (tokenizers / "qwen2").iterdir():
        shutil.copy(f, path / f.name)
    return save_hf("qwen2", 151646, path)


@pytest.fixture(scope="module", params=["llama", "llama-sp", "qwen2"])
def hf_dir(request, tmp_path_factory, our_tokenizer) -> tuple[str, Path]:
    return request.param, model_dir(request.param, tmp_path_factory, our_tokenizer)


def hf_reference(path: Path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return tok, model


# ---- the official prompt formats, written out independently --------------------------------------------------------
def cmmlu_prompt(subject_zh: str, shots: list, q) -> str:
    """CMMLU src/mp_utils.py: gen_prompt + format_example."""
    def fmt(row, answer: bool) -> str:
        text = "题目：" + row[0] + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", row[1:5])) + "\n答案是："
        return text + (f"{row[5]}\n\n" if answer else "")
    return (f"以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n\n" + "".join(fmt(s, True) for s in shots)
            + fmt(q, False))


def test_prompt_formats_are_the_official_ones(data):
    cmmlu = K.load_questions("cmmlu", data.cmmlu, shots=2)
    q = cmmlu[0]
    rows = CMMLU_ROWS["agronomy"]
    assert (q.subject, q.id, q.letter, q.source) == ("agronomy", "0", rows[DEV][5], f"{data.cmmlu}/test/agronomy.csv:2")
    assert K.plain_prompt(q) == cmmlu_prompt("农学", rows[:2], rows[DEV])
    assert K.plain_prompt(q, cloze=True) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        f"题目：{rows[0][0]}\n答案是：{rows[0][2]}\n\n题目：{rows[1][0]}\n答案是：{rows[1][3]}\n\n"
        f"题目：{rows[DEV][0]}\n答案是：")
    assert q.categories == ("Other",) and cmmlu[-1].categories == ("STEM",)
    assert K.load_questions("cmmlu", data.cmmlu, subjects=["chinese_history"])[0].categories == (
        "Humanities", "China specific")

    ceval = K.load_questions("ceval", data.ceval, shots=1)  # default split: val
    q = next(x for x in ceval if x.subject == "high_school_physics")
    rows = CMMLU_ROWS["high_school_physics"]
    opts = lambda r: "".join(f"\n{c}. {o}" for c, o in zip("ABCD", r[1:5]))  # noqa: E731
    # C-Eval evaluators/llama.py: header, examples "{q}\nA. ..\n答案：X\n\n", the question ending 答案：
    assert K.plain_prompt(q) == ("以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
                                 f"{rows[0][0]}{opts(rows[0])}\n答案：{rows[0][5]}\n\n{rows[DEV][0]}{opts(rows[DEV])}\n答案：")
    # C-Eval evaluators/chatgpt.py: system prompt, examples as turns, the header repeated in the first user turn
    header = "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。"
    assert K.chat_messages(q) == [
        {"role": "system", "content": "你是一个中文人工智能助手，" + header},
        {"role": "user", "content": f"{header}\n\n{rows[0][0]}{opts(rows[0])}\n答案："},
        {"role": "assistant", "content": rows[0][5]},
        {"role": "user", "content": f"{rows[DEV][0]}{opts(rows[DEV])}\n答案："}]

    gaokao = K.load_questions("gaokao", data.gaokao)
    assert [q.id for q in gaokao] == ["0", "1", "3"] and gaokao.skipped == {"several_answers": 1}
    assert gaokao[0].choices == ("河南、河北", "湖南、湖北", "山东、山西", "广东、广西") and gaokao[0].letter == "C"
    assert gaokao[0].question.endswith("（　　）") and gaokao[2].choices == ("",) * 4
    assert K.plain_prompt(gaokao[0]) == ("以下是中国关于高考历史考试的单项选择题，请选出其中的正确答案。\n\n"
                                         + GAOKAO_EXAMPLES[0]["question"].strip() + "\n答案：")


def test_split_options_variants():
    assert K.split_options("问题 A.甲 B.乙 C.丙 D.丁") == ("问题", ("甲", "乙", "丙", "丁"))
    assert K.split_options("A、一\nB、二\nC、三\nD、四") == ("", ("一", "二", "三", "四"))
    # the last A..D run wins (a stem may mention an earlier "A.")
    assert K.split_options("图A.所示 A．x B．y C．z D．w")[1] == ("x", "y", "z", "w")
    assert K.split_options("没有选项") == ("没有选项", ("",) * 4)


def test_shots_limit_and_subject_filter(data):
    qs = K.load_questions("cmmlu", data.cmmlu, shots=5)
    assert all(len(q.shots) == 5 for q in qs) and qs[0].shots[0].question == CMMLU_ROWS["agronomy"][0][0]
    dev = K.load_questions("cmmlu", data.cmmlu, split="dev", shots=2)
    assert all(q.id not in {s.id for s in q.shots} for q in dev)  # a dev question is never its own example
    limited = K.load_questions("cmmlu", data.cmmlu, limit=4)
    assert len(limited) == 4 and set(Counter(q.subject for q in limited).values()) == {1, 2}
    assert len({q.subject for q in limited}) == 3  # round-robin: every subject before any gets a second
    only = K.load_questions("cmmlu", data.cmmlu, subjects=["agronomy"])
    assert {q.subject for q in only} == {"agronomy"}
    with pytest.raises(ValueError, match="no subject nope; known: agronomy, chinese_history"):
        K.load_questions("cmmlu", data.cmmlu, subjects=["nope"])
    with pytest.raises(ValueError, match="5 dev questions for 6-shot"):
        K.load_questions("cmmlu", data.cmmlu, shots=6)
    with pytest.raises(ValueError, match="no dev split"):
        K.load_questions("gaokao", data.gaokao, shots=1)


# ---- parity: the official letter-logit method and lm-evaluation-harness ---------------------------------------------
def test_letter_scores_equal_transformers(hf_dir, data):
    """Per-question option scores (log-probabilities of the letter tokens at the prompt's last position) equal an
    independent computation: the official prompt string, transformers' tokenizer (bos as tokenizer() adds it), the HF
    model one question at a time, and the letter token that `prompt + "A"` continues the prompt with. Ours runs
    batched (3 prompts of different lengths, left-padded) on our Transformer."""
    kind, path = hf_dir
    hf_tok, hf = hf_reference(path)
    model, tok = load_chat_model(path, device="cpu", dtype="float32")
    questions = K.load_questions("cmmlu", data.cmmlu, shots=1, limit=7 if kind == "llama" else 4)
    results = K.score(model, tok, questions, "letter", batch_size=3)
    zh = {"agronomy": "农学", "chinese_history": "中国历史", "high_school_physics": "高中物理学"}
    for q, row in zip(questions, results.questions):
        rows = CMMLU_ROWS[q.subject]
        prompt = cmmlu_prompt(zh[q.subject], rows[:1], next(r for r in rows[DEV:] + rows[:1] if r[0] == q.question))
        ids = hf_tok(prompt)["input_ids"]
        letters = [hf_tok(prompt + c)["input_ids"][len(ids)] for c in "ABCD"]
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        expected = logp[letters].tolist()
        assert row["scores"] == pytest.approx(expected, abs=1e-4), (kind, q.source)
        assert row["prediction"] == "ABCD"[int(np.argmax(expected))]
        if kind == "llama-sp":  # the continuation's "A" (29909), not encode("A")'s "▁A" (319)
            assert letters == hf_tok.convert_tokens_to_ids(list("ABCD")) == [29909, 29933, 29907, 29928]
            assert hf_tok.encode("A", add_special_tokens=False) == [319] and ids[0] == hf_tok.bos_token_id
    assert np.ptp(np.array([r["scores"] for r in results.questions]), axis=0).max() > 1e-3  # scores vary


def test_chat_template_letter_scores_equal_transformers(tmp_path_factory, our_tokenizer, data):
    """C-Eval under Qwen2's chat template (its chatgpt.py conversation): the prompt ids are transformers'
    apply_chat_template of the same messages, the letter the first token of the assistant's reply."""
    path = model_dir("qwen2", tmp_path_factory, our_tokenizer)
    hf_tok, hf = hf_reference(path)
    model, tok = load_chat_model(path, device="cpu", dtype="float32")
    questions = K.load_questions("ceval", data.ceval, shots=1)
    results = K.score(model, tok, questions, "letter", template="qwen", batch_size=4)
    assert results.info["template"] == "qwen"
    for q, row in zip(questions, results.questions):
        ids = hf_tok.apply_chat_template(K.chat_messages(q), add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        letters = [hf_tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"]
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        assert row["scores"] == pytest.approx(logp[letters].tolist(), abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "llama-sp"])
def test_loglik_equals_plain_transformers(kind, data, tmp_path_factory, our_tokenizer):
    """loglik: each option's summed log-likelihood after the cloze prompt equals a plain transformers computation
    (lm-evaluation-harness's split: encode(context + option) after len(encode(context)) tokens, bos as
    tokenizer() adds it), and loglik_norm divides by the option's characters."""
    path = model_dir(kind, tmp_path_factory, our_tokenizer)
    hf_tok, hf = hf_reference(path)
    model, tok = load_chat_model(path, device="cpu", dtype="float32")
    questions = K.load_questions("cmmlu", data.cmmlu, shots=1, limit=3 if kind == "llama-sp" else 6)
    res = K.score_methods(model, tok, questions, ["loglik", "loglik_norm"], batch_size=5)
    for i, q in enumerate(questions):
        context = K.plain_prompt(q, cloze=True)
        ctx = hf_tok(context)["input_ids"]
        lls = []
        for option in q.choices:
            whole = hf_tok(context + option)["input_ids"]
            with torch.no_grad():
                logp = hf(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole))))
        assert res["loglik"].questions[i]["scores"] == pytest.approx(lls, abs=1e-4)
        assert res["loglik"].questions[i]["prediction"] == "ABCD"[int(np.argmax(lls))]
        norm = [ll / len(o) for ll, o in zip(lls, q.choices)]
        assert res["loglik_norm"].questions[i]["prediction"] == "ABCD"[int(np.argmax(norm))]


LM_EVAL_TASK = """task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\\n\\n"
doc_to_text: "题目：{{{{Question}}}}\\n答案是："
doc_to_choice: "{{{{[A, B, C, D]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(Answer)}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "llama-sp"])
def test_loglik_choices_equal_lm_evaluation_harness(kind, data, tmp_path_factory, our_tokenizer, tmp_path,
                                                    monkeypatch):
    """lm-evaluation-harness 0.4 (test-only dependency) on the same local CSV files through a custom task config
    (no download): its per-option log-likelihoods, acc and acc_norm choices equal ours, 1-shot; with our tokenizer
    and with the LLaMA SentencePiece one (whose bos both sides add)."""
    pytest.importorskip("lm_eval", reason="lm-eval (requirements-dev.txt) is the loglik reference")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    path = model_dir(kind, tmp_path_factory, our_tokenizer)
    zh = {"agronomy": "农学", "chinese_history": "中国历史", "high_school_physics": "高中物理学"}
    for subject in CMMLU_ROWS:
        (tmp_path / f"{subject}.yaml").write_text(LM_EVAL_TASK.format(
            task=f"local_cmmlu_{subject}", zh=zh[subject], test=data.cmmlu / "test" / f"{subject}.csv",
            dev=data.cmmlu / "dev" / f"{subject}.csv"), encoding="utf-8")
    out = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32,device=cpu",
                          tasks=[f"local_cmmlu_{s}" for s in CMMLU_ROWS], num_fewshot=1, batch_size=1,
                          log_samples=True, task_manager=TaskManager(include_path=str(tmp_path)))
    model, tok = load_chat_model(path, device="cpu", dtype="float32")
    questions = K.load_questions("cmmlu", data.cmmlu, shots=1)
    ours = K.score_methods(model, tok, questions, ["loglik", "loglik_norm"], batch_size=4)
    compared = 0
    for subject in CMMLU_ROWS:
        samples = sorted(out["samples"][f"local_cmmlu_{subject}"], key=lambda s: s["doc_id"])
        mine = [(i, q) for i, q in enumerate(questions) if q.subject == subject]
        assert len(samples) == len(mine)
        for sample, (i, q) in zip(samples, mine):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            assert ours["loglik"].questions[i]["scores"] == pytest.approx(lls, abs=1e-4)
            assert ours["loglik"].questions[i]["correct"] == bool(sample["acc"])
            assert ours["loglik_norm"].questions[i]["correct"] == bool(sample["acc_norm"])
            compared += 1
    assert compared == len(questions)


# ---- batching, windows, modes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(our_tokenizer) -> tuple[Transformer, Tokenizer]:
    tok = Tokenizer.load(our_tokenizer)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                    max_position_embeddings=512, tie_word_embeddings=False))
    return model.eval(), tok


def test_batch_size_does_not_change_scores_and_mode_is_restored(tiny, data):
    model, tok = tiny
    questions = K.load_questions("cmmlu", data.cmmlu, shots=2, limit=6)
    model.train()
    one = K.score_methods(model, tok, questions, ["letter", "loglik"], batch_size=1)
    assert model.training  # the trainer calls the harness mid-training
    model.eval()
    many = K.score_methods(model, tok, questions, ["letter", "loglik"], batch_size=7)
    for name in ("letter", "loglik"):
        a = np.array([r["scores"] for r in one[name].questions])
        b = np.array([r["scores"] for r in many[name].questions])
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_long_prompts_drop_examples_then_truncate(tiny, data):
    """A prompt over the context window loses its longest dev example first (CMMLU's gen_prompt), then its oldest
    tokens; both are counted."""
    model, tok = tiny
    questions = K.load_questions("cmmlu", data.cmmlu, shots=5)
    longest = max(len(tok.encode(K.plain_prompt(q))) for q in questions)
    model.config.max_position_embeddings = longest - 1
    try:
        r = K.score(model, tok, questions, "letter")
        assert r.info["shots_dropped"] > 0 and r.info["truncated"] == 0
        model.config.max_position_embeddings = 20
        r = K.score(model, tok, questions, "letter")
        assert r.info["shots_dropped"] == 5 * len(questions) and r.info["truncated"] == len(questions)
    finally:
        model.config.max_position_embeddings = 512


def test_gaokao_scores_single_answer_questions(tiny, data):
    model, tok = tiny
    res = K.evaluate_task(model, tok, "gaokao", data.gaokao, methods=["letter", "loglik"])
    assert res["letter"].overall.n == 3 and res["letter"].info["skipped_several_answers"] == 1
    assert res["loglik"].overall.n == 2 and res["loglik"].info["skipped_no_option_text"] == 1
    assert [c.name for c in res["letter"].categories] == ["Humanities"]


# ---- figures ---------------------------------------------------------------------------------------------------------
def test_aggregate_figures_by_hand(data):
    questions = K.load_questions("cmmlu", data.cmmlu)  # 5 agronomy (Other), 4 chinese_history, 3 physics
    answers = [q.answer for q in questions]
    predictions = [a if i % 2 == 0 else (a + 1) % 4 for i, a in enumerate(answers)]  # every other one right
    r = K.aggregate(questions, predictions, "given")
    n, correct = len(questions), sum(p == a for p, a in zip(predictions, answers))
    assert (r.overall.n, r.overall.correct) == (n, correct)
    assert r.overall.centered == pytest.approx((correct / n - 0.25) / 0.75)
    lo, hi = r.overall.ci95
    p, z = correct / n, 1.959963984540054
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((center - half, center + half))
    subjects = {s.name: s for s in r.subjects}
    assert r.overall.macro == pytest.approx(np.mean([s.accuracy for s in subjects.values()]))
    cats = {c.name: c for c in r.categories}
    assert list(cats) == ["STEM", "Humanities", "Other", "China specific"]  # the benchmark's order, present ones
    assert cats["China specific"].n == subjects["chinese_history"].n == cats["Humanities"].n
    perfect = K.aggregate(questions, answers)
    assert perfect.overall.centered == 1.0 and perfect.overall.accuracy == 1.0
    row = r.to_dict()["subjects"][0]
    assert set(row) >= {"name", "name_zh", "categories", "n", "accuracy", "ci95", "centered_accuracy"}


# ---- the real CMMLU files -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmmlu_dir() -> Path:
    return shared_dir("eval/cmmlu", "the CMMLU files")


@pytest.fixture(scope="module")
def cmmlu_test(cmmlu_dir):
    return K.load_questions("cmmlu", cmmlu_dir)


def test_real_cmmlu_parses_every_subject(cmmlu_dir, cmmlu_test):
    files = sorted(p.stem for p in (cmmlu_dir / "test").glob("*.csv"))
    assert len(files) == 67 and sorted({q.subject for q in cmmlu_test}) == files
    assert len(cmmlu_test) == 11582
    assert all(q.subject in K._CMMLU for q in cmmlu_test)  # every subject has its official name and category
    dev = K.load_questions("cmmlu", cmmlu_dir, split="dev")
    assert len(dev) == 5 * 67
    shots = K.load_questions("cmmlu", cmmlu_dir, subjects=["anatomy"], shots=5)
    assert all(len(q.shots) == 5 for q in shots) and shots[0].shots[0].question == "壁胸膜的分部不包括"
    r = K.aggregate(cmmlu_test, [q.answer for q in cmmlu_test])
    assert [c.name for c in r.categories] == ["STEM", "Humanities", "Social Science", "Other", "China specific"]
    assert sum(s.subjects for s in r.categories[:4]) == 67  # every subject in one of the four, some also China


def test_real_cmmlu_answer_distribution(cmmlu_dir, cmmlu_test):
    """The answers equal an independent read of the files (pandas, every cell a string)."""
    import pandas as pd

    expected = Counter()
    for f in sorted((cmmlu_dir / "test").glob("*.csv")):
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
        expected.update(df["Answer"].str.strip())
        mine = [q for q in cmmlu_test if q.subject == f.stem]
        assert [q.letter for q in mine] == df["Answer"].str.strip().tolist()
        assert [q.choices for q in mine] == list(map(tuple, df[["A", "B", "C", "D"]].values.tolist()))
    assert Counter(q.letter for q in cmmlu_test) == expected == {"A": 2926, "B": 2883, "C": 2877, "D": 2896}


class FixedLetter(torch.nn.Module):
    """A "model" whose next-token logits always favour one token."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=1 << 20)
        self.logits = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.logits[token] = 10.0

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        return self.logits.expand(input_ids.shape[0], logits_to_keep or input_ids.shape[1], -1)


def test_real_cmmlu_always_a_scores_the_share_of_a(cmmlu_test, our_tokenizer):
    tok = Tokenizer.load(our_tokenizer)
    a = K._encode(cmmlu_test[:1], tok, None, cloze=False)[0].options[0][0]
    r = K.score(FixedLetter(tok.vocab_size, a), tok, cmmlu_test, "letter", batch_size=256)
    share = sum(q.letter == "A" for q in cmmlu_test)
    assert r.overall.correct == share and r.overall.accuracy == share / len(cmmlu_test)
    for s in r.subjects:
        assert s.correct == sum(q.letter == "A" for q in cmmlu_test if q.subject == s.name)
    assert {row["prediction"] for row in r.questions} == {"A"}


def test_real_cmmlu_random_guesser_is_centered_at_zero(cmmlu_test):
    answers = np.array([q.answer for q in cmmlu_test])
    centered, covered = [], 0
    for seed in range(30):
        guesses = np.random.default_rng(seed).integers(0, 4, len(answers))
        r = K.aggregate(cmmlu_test, guesses)
        assert r.overall.correct == int((guesses == answers).sum())
        centered.append(r.overall.centered)
        lo, hi = r.overall.centered_ci95
        covered += lo < 0 < hi
    # one run's centered accuracy has a standard error of sqrt(3/16 / n) / (3/4) = 0.0054; the mean of 30, 0.001
    assert abs(np.mean(centered)) < 0.004 and np.std(centered) < 0.012
    assert covered >= 25  # the 95% interval holds 0 in about 28 or 29 of 30 runs


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_malformed_files_name_the_file_and_line(tmp_path):
    root = write_cmmlu(tmp_path / "cmmlu")
    bad = root / "test" / "agronomy.csv"
    # a quoted field over two lines (line 2-3), then a row with a missing field on line 4
    bad.write_text(',Question,A,B,C,D,Answer\n0,"两行\n的题目",甲,乙,丙,丁,A\n1,缺一列,甲,乙,丙,B\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:4: 6 fields, expected 7"):
        K.load_questions("cmmlu", root)
    bad.write_text(",Question,A,B,C,D,Answer\n0,题目,甲,乙,丙,丁,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:2: answer 'E' is not one of A, B, C, D"):
        K.load_questions("cmmlu", root)
    bad.write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad}:1: header .* is not CMMLU's ,Question,A,B,C,D,Answer"):
        K.load_questions("cmmlu", root)
    bad.write_bytes(",Question,A,B,C,D,Answer\n0,题目,甲,乙,丙,丁,A\n".encode() + b"1,\xff\xfe,a,b,c,d,A\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: not UTF-8"):
        K.load_questions("cmmlu", root)
    with pytest.raises(FileNotFoundError, match="no test/ directory"):
        K.load_questions("cmmlu", tmp_path)
    gaokao = write_gaokao(tmp_path / "gaokao") / "Objective_Questions" / "2010-2022_History_MCQs.json"
    gaokao.write_text('{\n  "example": [\n    {"question": "q", "answer": ["A"],}\n  ]\n}', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{gaokao}:3: not valid JSON"):
        K.load_questions("gaokao", tmp_path / "gaokao")


def test_ceval_test_split_is_refused(data):
    with pytest.raises(ValueError, match="test split has no answers .* --split val"):
        K.load_questions("ceval", data.ceval, split="test")
    with pytest.raises(ValueError, match="test split has no answers"):  # before the model is even looked at
        train.main(["eval", "--model", "no-such-model", "--task", "ceval", "--data", str(data.ceval),
                    "--split", "test"])
    with pytest.raises(ValueError, match="no split 'valid'"):
        K.load_questions("cmmlu", data.cmmlu, split="valid")


# ---- train.py eval --task -------------------------------------------------------------------------------------------
def test_eval_cli_cmmlu(data, tmp_path_factory, our_tokenizer, tmp_path, capsys):
    path = model_dir("llama", tmp_path_factory, our_tokenizer)
    out, preds = tmp_path / "cmmlu.json", tmp_path / "preds.jsonl"
    train.main(["eval", "--model", str(path), "--task", "cmmlu", "--data", str(data.cmmlu), "--shots", "1",
                "--method", "letter", "loglik", "--batch-size", "4", "--device", "cpu", "--no-progress",
                "--limit", "7", "--out", str(out), "--predictions", str(preds)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["task"], report["split"], report["shots"], report["template"]) == ("cmmlu", "test", 1, "none")
    assert list(report["methods"]) == ["letter", "loglik", "loglik_norm"]
    letter = report["methods"]["letter"]
    n = 7
    assert letter["overall"]["n"] == report["questions"] == n and letter["method"] == "letter"
    assert [s["name"] for s in letter["subjects"]] == list(CMMLU_ROWS)
    assert {"accuracy", "centered_accuracy", "ci95", "macro_accuracy"} <= set(letter["overall"])
    # the same numbers as the Python API
    model, tok = load_chat_model(path, device="cpu", dtype="float32")
    api = K.evaluate_task(model, tok, "cmmlu", data.cmmlu, methods=["letter"], shots=1, limit=7, batch_size=2)
    assert [s.to_dict() for s in api["letter"].subjects] == letter["subjects"]
    lines = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == n and set(lines[0]["methods"]) == {"letter", "loglik", "loglik_norm"}
    assert len(lines[0]["methods"]["letter"]["scores"]) == 4
    printed = capsys.readouterr().out
    assert "CMMLU test · 1-shot · method letter" in printed and "centered" in printed and "China specific" in printed


def test_eval_cli_ceval_chat_template_to_stdout(data, tmp_path_factory, our_tokenizer, capsys):
    path = model_dir("llama", tmp_path_factory, our_tokenizer)
    train.main(["eval", "--model", str(path), "--task", "ceval", "--data", str(data.ceval), "--template", "default",
                "--subjects", "high_school_physics", "--limit", "1", "--device", "cpu", "--no-progress",
                "--out", "-"])
    report = json.loads(capsys.readouterr().out)
    assert (report["split"], report["template"], report["questions"]) == ("val", "chatml", 1)
    assert report["methods"]["letter"]["categories"][0]["name"] == "STEM"
