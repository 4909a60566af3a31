"""Knowledge benchmarks: CMMLU, C-Eval and GAOKAO-Bench multiple choice, scored the benchmarks' own way, batched.

    questions = load_questions("cmmlu", "../shared/eval/cmmlu", shots=5)
    results = score(model, tokenizer, questions, method="letter")
    results.overall.accuracy, results.overall.centered, results.overall.n

    python train.py eval --model DIR --task cmmlu --data ../shared/eval/cmmlu [--shots 5] [--method letter loglik]

Data, as each benchmark ships it (`--data` is that directory):

- **CMMLU** (haonan-li/CMMLU `data/`): `dev/SUBJECT.csv` and `test/SUBJECT.csv`, header `,Question,A,B,C,D,Answer`;
  67 subjects. Splits: test, dev.
- **C-Eval** (hkust-nlp/ceval): `dev/SUBJECT_dev.csv`, `val/SUBJECT_val.csv`, `test/SUBJECT_test.csv`, header
  `id,question,A,B,C,D,answer[,explanation]`; 52 subjects. The test split ships without answers (the leaderboard keeps
  them), so it is refused rather than scored as all wrong. Splits: val, dev.
- **GAOKAO-Bench** (OpenLMLab/GAOKAO-Bench `Data/Objective_Questions/`): `YYYY-YYYY_SUBJECT.json` =
  `{"example": [{"question", "answer": ["B"], ...}]}` with the options inside the question text. Only single-answer
  questions are scored (multi-select and multi-question items have several answers, which a one-letter score cannot
  express; they are counted as skipped). One split ("test"); no dev split, so no few-shot prompts.

Prompt formats (which official script each follows, and why):

- CMMLU follows `src/mp_utils.py` (`gen_prompt` / `format_example`), the script behind the published CMMLU numbers:
  `以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n`, K dev examples
  `题目：{q}\\nA. {a}\\nB. ...\\nD. {d}\\n答案是：{X}\\n\\n`, then the question in the same form ending `答案是：`.
  The examples are the first K rows of `dev/SUBJECT.csv`; when the prompt does not fit the context window the
  longest example is dropped first, as `gen_prompt` does. With a chat template the whole text is one user message
  (`src/qwen1.5.py`'s `eval_chat`).
- C-Eval follows `code/evaluator_series/evaluators/llama.py` (its logit-scoring evaluator):
  `以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n`, examples
  `{q}\\nA. {a}\\n...\\nD. {d}\\n答案：{X}\\n\\n`, then the question ending `答案：`. The subject is the Chinese
  name of `subject_mapping.json` (the official script passes whatever `--subject` holds; the README's prompt figure
  and lm-evaluation-harness's ceval tasks use the Chinese name). With a chat template it is
  `evaluators/chatgpt.py`'s conversation: the system prompt `你是一个中文人工智能助手，...`, each example a user turn
  ending `答案：` and an assistant turn with its letter, the header repeated in the first user turn.
- GAOKAO-Bench's own prompts ask for a chain of thought and a generated `【答案】`, which a next-token score cannot use;
  its questions are asked in C-Eval's logit format instead (`以下是中国关于高考{科目}考试的单项选择题...`, the question
  text as shipped, options included, then `答案：`).

Scoring methods (both named in every result):

- `letter`: the log-probability of each option letter as the next token after the prompt, the prediction is the
  largest (CMMLU's `hf_causal_model.py` and C-Eval's `llama.py` take the argmax of the same logits: the order is the
  same). The letter's token is the one the prompt's continuation produces: `encode(prompt + "A")` after the
  `encode(prompt)` tokens. This matters: a LLaMA tokenizer has both `▁A` and `A`, and after `答案：` the text continues
  with `A`, not with what `encode("A")` alone gives (`▁A`). Under a chat template it is the first token of the answer
  piece (`A` encoded as the assistant's reply, as SFT encoded the replies).
- `loglik` / `loglik_norm`: lm-evaluation-harness's `acc` / `acc_norm` on each option's text: the summed
  log-likelihood of the option's tokens after the prompt, and that sum divided by the option's length in characters.
  Option texts are scored after the benchmark's prompt without the option lines (`题目：{q}\\n答案是：{option}`;
  lm-evaluation-harness's "continuation" formulation of MMLU), with the dev examples answered by their option text.
  Tokens are split as the harness splits them: `encode(prompt + option)` after the `encode(prompt)` tokens.

The prompt is encoded with the tokenizer's bos first where it has one (LLaMA, Baichuan), as `tokenizer(prompt)` does in
the official scripts; text from the data is always plain text (`special=False`): a question cannot forge a marker.

Figures: accuracy over questions with a 95% Wilson interval; **centered accuracy** `(acc - 1/k) / (1 - 1/k)` (chance 0,
perfect 1; k the number of options, averaged as 1/k over the questions when it varies); and the benchmarks' own
macro average (the mean of subject accuracies, how CMMLU's `get_results` reports categories and the overall score).
Categories are the benchmarks' own: CMMLU's STEM / Humanities / Social Science / Other / China specific (a subject of
"China specific" is also in its other category), C-Eval's STEM / Social Science / Humanities / Other; GAOKAO-Bench
subjects are grouped the same way here (its paper only splits 文科 / 理科).

Speed: one forward per batch of prompts, sorted by length and left-padded with an attention mask (none when a batch
has a single length); `letter` computes only the last position's logits (`logits_to_keep=1`), `loglik` only the
options' positions. No Python loop runs per question around the model.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

from model.generation import DECODE_SDPA_BACKENDS
from utils.progress import progress_bar
from utils.templates import ChatTemplate, encode_segments, ends_turn_with_token, get_template

LETTERS = "ABCD"
METHODS = ("letter", "loglik", "loglik_norm")
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval

# ---- the benchmarks' subjects and categories -------------------------------------------------------------------------
# CMMLU src/categories.py: subject -> (Chinese name, subcategories); a subcategory -> its category
_CMMLU_CATEGORY = {
    **dict.fromkeys(["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
                    "STEM"),
    **dict.fromkeys(["history", "philosophy", "law", "arts", "literature", "global"], "Humanities"),
    **dict.fromkeys(["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                     "education", "sociology"], "Social Science"),
    "other": "Other", "china specific": "China specific",
}
_CMMLU = {
    "agronomy": ("农学", "other"), "anatomy": ("解剖学", "biology"),
    "ancient_chinese": ("古汉语", "linguistics", "china specific"), "arts": ("艺术学", "arts"),
    "astronomy": ("天文学", "physics"), "business_ethics": ("商业伦理", "business"),
    "chinese_civil_service_exam": ("中国公务员考试", "politics", "china specific"),
    "chinese_driving_rule": ("中国驾驶规则", "other", "china specific"),
    "chinese_food_culture": ("中国饮食文化", "culture", "china specific"),
    "chinese_foreign_policy": ("中国外交政策", "politics", "china specific"),
    "chinese_history": ("中国历史", "history", "china specific"),
    "chinese_literature": ("中国文学", "literature", "china specific"),
    "chinese_teacher_qualification": ("中国教师资格", "education", "china specific"),
    "clinical_knowledge": ("临床知识", "other"), "college_actuarial_science": ("大学精算学", "math"),
    "college_education": ("大学教育学", "education"),
    "college_engineering_hydrology": ("大学工程水文学", "engineering"),
    "college_law": ("大学法律", "law"), "college_mathematics": ("大学数学", "math"),
    "college_medical_statistics": ("大学医学统计", "statistics"), "college_medicine": ("大学医学", "other"),
    "computer_science": ("计算机科学", "computer science"), "computer_security": ("计算机安全", "other"),
    "conceptual_physics": ("概念物理学", "physics"),
    "construction_project_management": ("建设工程管理", "other", "china specific"),
    "economics": ("经济学", "economics"), "education": ("教育学", "education"),
    "electrical_engineering": ("电气工程", "engineering"),
    "elementary_chinese": ("小学语文", "linguistics", "china specific"),
    "elementary_commonsense": ("小学常识", "other", "china specific"),
    "elementary_information_and_technology": ("小学信息技术", "other"), "elementary_mathematics": ("初等数学", "math"),
    "ethnology": ("民族学", "culture", "china specific"), "food_science": ("食品科学", "other"),
    "genetics": ("遗传学", "biology"), "global_facts": ("全球事实", "global"),
    "high_school_biology": ("高中生物", "biology"), "high_school_chemistry": ("高中化学", "chemistry"),
    "high_school_geography": ("高中地理", "geography"), "high_school_mathematics": ("高中数学", "math"),
    "high_school_physics": ("高中物理学", "physics"),
    "high_school_politics": ("高中政治", "politics", "china specific"), "human_sexuality": ("人类性行为", "other"),
    "international_law": ("国际法学", "law"), "journalism": ("新闻学", "sociology"), "jurisprudence": ("法理学", "law"),
    "legal_and_moral_basis": ("法律与道德基础", "other"), "logical": ("逻辑学", "philosophy"),
    "machine_learning": ("机器学习", "computer science"), "management": ("管理学", "business"),
    "marketing": ("市场营销", "business"), "marxist_theory": ("马克思主义理论", "philosophy"),
    "modern_chinese": ("现代汉语", "linguistics", "china specific"), "nutrition": ("营养学", "other"),
    "philosophy": ("哲学", "philosophy"), "professional_accounting": ("专业会计", "business"),
    "professional_law": ("专业法学", "law"), "professional_medicine": ("专业医学", "other"),
    "professional_psychology": ("专业心理学", "psychology"), "public_relations": ("公共关系", "politics"),
    "security_study": ("安全研究", "politics"), "sociology": ("社会学", "culture"),
    "sports_science": ("体育学", "other"),
    "traditional_chinese_medicine": ("中医中药", "other", "china specific"), "virology": ("病毒学", "biology"),
    "world_history": ("世界历史", "history"), "world_religions": ("世界宗教", "global"),
}
# C-Eval subject_mapping.json: subject -> (Chinese name, category); its clinical_medicine entry lacks the category,
# which the C-Eval paper lists under Other
_CEVAL = {
    **{s: (zh, "STEM") for s, zh in [
        ("computer_network", "计算机网络"), ("operating_system", "操作系统"), ("computer_architecture", "计算机组成"),
        ("college_programming", "大学编程"), ("college_physics", "大学物理"), ("college_chemistry", "大学化学"),
        ("advanced_mathematics", "高等数学"), ("probability_and_statistics", "概率统计"),
        ("discrete_mathematics", "离散数学"), ("electrical_engineer", "注册电气工程师"),
        ("metrology_engineer", "注册计量师"), ("high_school_mathematics", "高中数学"),
        ("high_school_physics", "高中物理"), ("high_school_chemistry", "高中化学"),
        ("high_school_biology", "高中生物"), ("middle_school_mathematics", "初中数学"),
        ("middle_school_biology", "初中生物"), ("middle_school_physics", "初中物理"),
        ("middle_school_chemistry", "初中化学"), ("veterinary_medicine", "兽医学")]},
    **{s: (zh, "Social Science") for s, zh in [
        ("college_economics", "大学经济学"), ("business_administration", "工商管理"),
        ("marxism", "马克思主义基本原理"), ("mao_zedong_thought", "毛泽东思想和中国特色社会主义理论体系概论"),
        ("education_science", "教育学"), ("teacher_qualification", "教师资格"),
        ("high_school_politics", "高中政治"), ("high_school_geography", "高中地理"),
        ("middle_school_politics", "初中政治"), ("middle_school_geography", "初中地理")]},
    **{s: (zh, "Humanities") for s, zh in [
        ("modern_chinese_history", "近代史纲要"), ("ideological_and_moral_cultivation", "思想道德修养与法律基础"),
        ("logic", "逻辑学"), ("law", "法学"), ("chinese_language_and_literature", "中国语言文学"),
        ("art_studies", "艺术学"), ("professional_tour_guide", "导游资格"), ("legal_professional", "法律职业资格"),
        ("high_school_chinese", "高中语文"), ("high_school_history", "高中历史"),
        ("middle_school_history", "初中历史")]},
    **{s: (zh, "Other") for s, zh in [
        ("civil_servant", "公务员"), ("sports_science", "体育学"), ("plant_protection", "植物保护"),
        ("basic_medicine", "基础医学"), ("clinical_medicine", "临床医学"),
        ("urban_and_rural_planner", "注册城乡规划师"), ("accountant", "注册会计师"),
        ("fire_engineer", "注册消防工程师"),
        ("environmental_impact_assessment_engineer", "环境影响评价工程师"), ("tax_accountant", "税务师"),
        ("physician", "医师资格")]},
}
# GAOKAO-Bench objective files: a keyword of the file name -> (Chinese name, category)
_GAOKAO = [("Math_II", "文科数学", "STEM"), ("Math_I", "理科数学", "STEM"), ("Physics", "物理", "STEM"),
           ("Chemistry", "化学", "STEM"), ("Biology", "生物", "STEM"), ("History", "历史", "Humanities"),
           ("Chinese", "语文", "Humanities"), ("Geography", "地理", "Social Science"),
           ("Political", "政治", "Social Science"), ("English", "英语", "Other")]
_GAOKAO_FILE = re.compile(r"^\d{4}-\d{4}_\w+$")
_OPTION = re.compile(r"(?<![A-Za-z])([A-D])\s*[．.、:：]")


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    splits: tuple[str, ...]      # splits with answers
    default_split: str
    categories: tuple[str, ...]  # the table's order


BENCHMARKS = {
    "cmmlu": Benchmark("cmmlu", "CMMLU", ("test", "dev"), "test",
                       ("STEM", "Humanities", "Social Science", "Other", "China specific")),
    "ceval": Benchmark("ceval", "C-Eval", ("val", "dev"), "val", ("STEM", "Social Science", "Humanities", "Other")),
    "gaokao": Benchmark("gaokao", "GAOKAO-Bench", ("test",), "test",
                        ("STEM", "Humanities", "Social Science", "Other")),
}
TASKS = tuple(BENCHMARKS)


def subject_info(task: str, subject: str) -> tuple[str, tuple[str, ...]]:
    """(Chinese name, categories) of a subject; one the benchmark does not list is (its id, ("Other",))."""
    if task == "cmmlu" and subject in _CMMLU:
        zh, *subcats = _CMMLU[subject]
        return zh, tuple(dict.fromkeys(_CMMLU_CATEGORY[c] for c in subcats))
    if task == "ceval" and subject in _CEVAL:
        zh, category = _CEVAL[subject]
        return zh, (category,)
    if task == "gaokao":
        for key, zh, category in _GAOKAO:
            if key in subject:
                return "高考" + zh, (category,)
    return subject.replace("_", " "), ("Other",)


# ---- questions -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """One multiple-choice question. `question` is the stem without the options; GAOKAO's text as shipped (options
    inside) is `text`. `choices` are the option texts (empty where GAOKAO's could not be found in the text);
    `answer` the index of the correct one; `shots` the dev examples of its few-shot prompt; `source` "file:line"."""

    task: str
    subject: str
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""
    shots: tuple[Question, ...] = ()
    text: str | None = None

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def name_zh(self) -> str:
        return subject_info(self.task, self.subject)[0]

    @property
    def categories(self) -> tuple[str, ...]:
        return subject_info(self.task, self.subject)[1]


class Questions(list):
    """A list of Questions, plus `skipped`: what the files held that cannot be scored (GAOKAO-Bench's items with
    several answers), by reason."""

    skipped: dict[str, int]


def load_questions(task: str, data_dir: str | Path, split: str | None = None, subjects: Sequence[str] | None = None,
                   limit: int | None = None, shots: int = 0) -> Questions:
    """The questions of a benchmark directory laid out as it ships (see the module docstring), subject by subject in
    sorted order, each with its first `shots` dev examples (the same subject's dev/ split, in file order; a dev
    question is never its own example).

    subjects: only these (the benchmark's subject ids, e.g. "high_school_physics"). limit: at most this many
    questions in all, taken round-robin over the subjects (every subject's first questions in file order), so a small
    limit still covers every subject. A missing or malformed file raises an error naming the file and line."""
    if task not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {task!r}; known: {', '.join(TASKS)}")
    bench = BENCHMARKS[task]
    split = split or bench.default_split
    if task == "ceval" and split == "test":
        raise ValueError("C-Eval's test split has no answers (the leaderboard keeps them), so it cannot be scored "
                         "here: use --split val (or dev)")
    if split not in bench.splits:
        raise ValueError(f"{bench.title} has no split {split!r} with answers; use one of {', '.join(bench.splits)}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and task == "gaokao":
        raise ValueError("GAOKAO-Bench has no dev split to draw few-shot examples from: use --shots 0")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{bench.title} data directory not found: {root}")
    files = _subject_files(task, root, split)
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise ValueError(f"{bench.title} {split} has no subject {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(files))}")
        files = {s: f for s, f in files.items() if s in set(subjects)}
    skipped: dict[str, int] = defaultdict(int)
    per_subject = {s: _read_subject(task, s, f, skipped) for s, f in sorted(files.items())}
    if limit is not None:
        per_subject = _round_robin(per_subject, limit)
    if shots:
        dev_files = _subject_files(task, root, "dev")
        for s, questions in per_subject.items():
            if s not in dev_files:
                raise FileNotFoundError(f"{bench.title}: no dev file for subject {s} (needed for --shots {shots})")
            dev = _read_subject(task, s, dev_files[s], defaultdict(int))
            for i, q in enumerate(questions):
                pool = [d for d in dev if not (split == "dev" and d.id == q.id)]
                if len(pool) < shots:
                    raise ValueError(f"{dev_files[s]}: only {len(pool)} dev questions for {shots}-shot prompts; use "
                                     f"--shots {len(pool)} or fewer")
                questions[i] = replace(q, shots=tuple(pool[:shots]))
    out = Questions(q for questions in per_subject.values() for q in questions)
    out.skipped = dict(skipped)
    if not out:
        raise ValueError(f"{bench.title} {split}: no questions to score in {root}")
    return out


def _round_robin(per_subject: dict[str, list[Question]], limit: int) -> dict[str, list[Question]]:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    taken: dict[str, list[Question]] = {s: [] for s in per_subject}
    left, depth = limit, 0
    while left > 0 and any(depth < len(qs) for qs in per_subject.values()):
        for s, qs in per_subject.items():
            if depth < len(qs) and left > 0:
                taken[s].append(qs[depth])
                left -= 1
        depth += 1
    return {s: qs for s, qs in taken.items() if qs}


def _subject_files(task: str, root: Path, split: str) -> dict[str, Path]:
    title = BENCHMARKS[task].title
    if task == "gaokao":
        folder = root / "Objective_Questions" if (root / "Objective_Questions").is_dir() else root
        files = {p.stem: p for p in sorted(folder.glob("*.json")) if _GAOKAO_FILE.match(p.stem)}
        if not files:
            raise FileNotFoundError(f"{title}: no objective-question files (YYYY-YYYY_SUBJECT.json) in {folder} "
                                    "(its Data/Objective_Questions folder)")
        return files
    folder = root / split
    if not folder.is_dir():
        layout = "dev/ and test/ SUBJECT.csv" if task == "cmmlu" else "dev/, val/ and test/ SUBJECT_SPLIT.csv"
        raise FileNotFoundError(f"{title}: no {split}/ directory in {root} (the benchmark as it ships: {layout})")
    suffix = "" if task == "cmmlu" else f"_{split}"
    files = {p.stem[:len(p.stem) - len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}.csv"))}
    if not files:
        raise FileNotFoundError(f"{title}: no *{suffix}.csv files in {folder}")
    return files


def _read_subject(task: str, subject: str, path: Path, skipped: dict[str, int]) -> list[Question]:
    questions = _read_gaokao(path, subject, skipped) if task == "gaokao" else _read_csv(task, path, subject)
    if not questions and task != "gaokao":
        raise ValueError(f"{path}: no questions")
    return questions


_HEADERS = {"cmmlu": ["", "Question", "A", "B", "C", "D", "Answer"],
            "ceval": ["id", "question", "A", "B", "C", "D", "answer"]}


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _read_csv(task: str, path: Path, subject: str) -> list[Question]:
    expected = _HEADERS[task]
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None or header[:len(expected)] != expected or len(header) > len(expected) + (task == "ceval"):
            shown = ",".join(expected) + ("[,explanation]" if task == "ceval" else "")
            raise ValueError(f"{path}:1: header {','.join(header or [])!r} is not {BENCHMARKS[task].title}'s {shown}")
        questions, start = [], reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
            answer = row[6].strip()
            if answer not in LETTERS:
                raise ValueError(f"{where}: answer {row[6]!r} is not one of {', '.join(LETTERS)}")
            questions.append(Question(task, subject, row[0], row[1], tuple(row[2:6]), LETTERS.index(answer), where))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: {e}") from None
    return questions


def _read_gaokao(path: Path, subject: str, skipped: dict[str, int]) -> list[Question]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    examples = data.get("example") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise ValueError(f"{path}: no \"example\" list (GAOKAO-Bench's objective-question layout)")
    questions = []
    for i, ex in enumerate(examples):
        where = f"{path}: example {i}"
        if not isinstance(ex, dict) or not isinstance(ex.get("question"), str) or not isinstance(ex.get("answer"),
                                                                                                 list):
            raise ValueError(f"{where}: needs a \"question\" string and an \"answer\" list")
        answers = [str(a).strip() for a in ex["answer"]]
        if len(answers) != 1:
            skipped["several_answers"] += 1  # multi-select and multi-question items
            continue
        if answers[0] not in LETTERS:
            skipped["answer_not_A_to_D"] += 1
            continue
        stem, choices = split_options(ex["question"])
        qid = str(ex.get("index", i))
        questions.append(Question("gaokao", subject, qid, stem, choices, LETTERS.index(answers[0]), where,
                                  text=ex["question"]))
    return questions


def split_options(text: str) -> tuple[str, tuple[str, ...]]:
    """(stem, option texts) of a question whose options A-D are written inside it ("A．河南 B．湖南 ..."): the last
    A marker followed by B, C and D markers in order. When they are not all there: (text, four empty options)."""
    marks = list(_OPTION.finditer(text))
    for i in range(len(marks) - 1, -1, -1):
        if marks[i].group(1) != "A":
            continue
        found, want = [marks[i]], 1
        for m in marks[i + 1:]:
            if want < len(LETTERS) and m.group(1) == LETTERS[want]:
                found.append(m)
                want += 1
        if want == len(LETTERS):
            ends = [m.start() for m in found[1:]] + [len(text)]
            return text[:found[0].start()].strip(), tuple(text[m.end():e].strip() for m, e in zip(found, ends))
    return text.strip(), ("",) * len(LETTERS)


# ---- prompts ---------------------------------------------------------------------------------------------------------
def _example(q: Question, answered: bool, cloze: bool) -> str:
    """One question in its benchmark's format; `answered` adds the answer, `cloze` leaves out the option lines and
    answers with the option's text (the loglik formulation)."""
    if q.task == "gaokao":
        body = q.question if cloze else (q.text or q.question).strip()
    else:
        body = q.question if cloze else q.question + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, q.choices))
    if q.task == "cmmlu":
        text = f"题目：{body}\n答案是："
    else:
        text = f"{body}\n答案："
    if answered:
        text += (q.choices[q.answer] if cloze else q.letter) + "\n\n"
    return text


def _header(q: Question) -> str:
    if q.task == "cmmlu":
        return f"以下是关于{q.name_zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"以下是中国关于{q.name_zh}考试的单项选择题，请选出其中的正确答案。\n\n"


def plain_prompt(q: Question, cloze: bool = False, shots: Sequence[Question] | None = None) -> str:
    """The benchmark's text prompt: header, answered dev examples, the question up to `答案：` (`答案是：`)."""
    shots = q.shots if shots is None else shots
    return _header(q) + "".join(_example(s, True, cloze) for s in shots) + _example(q, False, cloze)


def chat_messages(q: Question, cloze: bool = False, shots: Sequence[Question] | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages: C-Eval's chatgpt.py conversation for C-Eval, one user message otherwise."""
    shots = q.shots if shots is None else shots
    if q.task != "ceval":
        return [{"role": "user", "content": plain_prompt(q, cloze, shots)}]
    header = _header(q)
    messages = [{"role": "system", "content": "你是一个中文人工智能助手，" + header.strip()}]
    for s in shots:
        messages += [{"role": "user", "content": _example(s, False, cloze)},
                     {"role": "assistant", "content": s.choices[s.answer] if cloze else s.letter}]
    messages.append({"role": "user", "content": _example(q, False, cloze)})
    messages[1]["content"] = header + messages[1]["content"]
    return messages


# ---- encoding --------------------------------------------------------------------------------------------------------
@dataclass
class _Encoded:
    context: list[int]
    options: list[list[int]]  # the continuation tokens of each option (letters or texts)
    shots: int
    truncated: bool = False


def _resolve_template(template: str | ChatTemplate | None, tokenizer) -> ChatTemplate | None:
    if template is None or template == "none":
        return None
    if isinstance(template, ChatTemplate):
        return template
    return get_template(tokenizer.default_template if template == "default" else template)


def _encode(questions: Sequence[Question], tokenizer, template: ChatTemplate | None, cloze: bool,
            shots: Sequence[Sequence[Question]] | None = None) -> list[_Encoded]:
    """Context ids and each option's continuation ids, all questions in a few batched encoder calls."""
    shots = [q.shots for q in questions] if shots is None else shots
    options = [list(q.choices) if cloze else list(LETTERS[:len(q.choices)]) for q in questions]
    if template is None:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        texts = [plain_prompt(q, cloze, s) for q, s in zip(questions, shots)]
        contexts = [bos + ids for ids in tokenizer.encode_batch(texts, special=False)]
        conts = _continuations(tokenizer, texts, contexts, options, bos)
    else:
        append_eos = not ends_turn_with_token(template, tokenizer)
        pieces = [template.pieces(chat_messages(q, cloze, s), add_generation_prompt=True)
                  for q, s in zip(questions, shots)]
        contexts = [ids for ids, _ in encode_segments(tokenizer, pieces, append_eos)]
        head = template.assistant.split("{content}")[0]  # template text before the answer (llama2: a space)
        flat = tokenizer.encode_batch([head + o for opts in options for o in opts], continuation=True, special=False)
        it = iter(flat)
        conts = [[next(it) for _ in opts] for opts in options]
    return [_Encoded(c, o, len(s)) for c, o, s in zip(contexts, conts, shots)]


def _continuations(tokenizer, texts: Sequence[str], contexts: Sequence[list[int]], options: Sequence[list[str]],
                   bos: list[int], checks: int = 16) -> list[list[list[int]]]:
    """Each option's continuation ids after its prompt, split as lm-evaluation-harness splits them:
    `encode(prompt + option)` after the `len(encode(prompt))` first tokens.

    Encoding every prompt again once per option costs more than the whole letter pass on a GPU, so the split is made
    on the prompt's last line (`答案是：`): the tokenizers here never merge across a newline (ours and Qwen2's
    pre-tokenizers cut there, a SentencePiece newline is a byte piece), so the tokens are the same. `checks` prompts
    spread over the list are also done the long way, and any difference falls back to it for all."""
    def whole_way(idx: Sequence[int]) -> list[list[list[int]]]:
        flat = [texts[i] + o for i in idx for o in options[i]]
        wholes = iter([bos + ids for ids in tokenizer.encode_batch(flat, special=False)])
        return [[next(wholes)[len(contexts[i]):] for _ in options[i]] for i in idx]

    tails = [t[t.rfind("\n") + 1:] if "\n" in t else None for t in texts]
    if None in tails:
        return whole_way(range(len(texts)))
    pairs = list(dict.fromkeys((tail, o) for tail, opts in zip(tails, options) for o in opts))
    heads = list(dict.fromkeys(tails))
    head_len = dict(zip(heads, map(len, tokenizer.encode_batch(heads, continuation=True, special=False))))
    split = {(t, o): ids[head_len[t]:] for (t, o), ids in
             zip(pairs, tokenizer.encode_batch([t + o for t, o in pairs], continuation=True, special=False))}
    conts = [[split[(tail, o)] for o in opts] for tail, opts in zip(tails, options)]
    sample = sorted(set(np.linspace(0, len(texts) - 1, min(checks, len(texts))).astype(int).tolist()))
    if whole_way(sample) != [conts[i] for i in sample]:
        return whole_way(range(len(texts)))
    return conts


def _fit(questions: Sequence[Question], encoded: list[_Encoded], tokenizer, template: ChatTemplate | None,
         cloze: bool, window: int) -> None:
    """Prompts longer than the context window lose their longest dev example first (CMMLU's gen_prompt), then the
    oldest tokens (lm-evaluation-harness's left truncation); `truncated` marks the latter."""
    def length(e: _Encoded) -> int:
        return len(e.context) + (max(map(len, e.options)) - 1 if cloze else 0)

    for i, q in enumerate(questions):
        shots = list(q.shots)
        while length(encoded[i]) > window and shots:
            shots.remove(max(shots, key=lambda s: len(_example(s, True, cloze))))
            encoded[i] = _encode([q], tokenizer, template, cloze, [shots])[0]
        if length(encoded[i]) > window:
            keep = window - (length(encoded[i]) - len(encoded[i].context))
            if keep < 1:
                raise ValueError(f"{q.source}: an option alone is longer than the context window of {window} tokens")
            encoded[i].context = encoded[i].context[-keep:]
            encoded[i].truncated = True


# ---- scoring ---------------------------------------------------------------------------------------------------------
def _config(model):
    return getattr(model, "config", None) or model.module.config


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T] left-padded ids and the attention mask (None when every row has the same length)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    T = int(lengths.max())
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
    mask = None
    if (lengths != T).any():
        mask = torch.from_numpy(np.arange(T)[None, :] >= (T - lengths)[:, None]).long().to(device)
    return torch.from_numpy(ids).to(device), mask


@torch.inference_mode()
def _letter_scores(model, encoded: Sequence[_Encoded], pad_id: int, batch_size: int, bar, task) -> np.ndarray:
    """[N, options] log-probabilities of each option's first continuation token at the prompt's last position."""
    k = max(len(e.options) for e in encoded)
    ids = torch.full((len(encoded), k), -1, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e.options)] = torch.tensor([o[0] for o in e.options])
    out = torch.full((len(encoded), k), float("nan"), dtype=torch.float64)
    device = _device(model)
    for rows in _batches([len(e.context) for e in encoded], batch_size):
        x, mask = _left_padded([encoded[i].context for i in rows], pad_id, device)
        logp = model(x, attention_mask=mask, logits_to_keep=1)[:, -1].float().log_softmax(-1)
        want = ids[rows].to(device)
        got = logp.gather(1, want.clamp(min=0)).double().cpu()
        out[rows] = torch.where(want.cpu() >= 0, got, out[rows])
        bar.advance(task, len(rows))
    return out.numpy()


@torch.inference_mode()
def _loglik_scores(model, encoded: Sequence[_Encoded], pad_id: int, batch_size: int, bar, task) -> np.ndarray:
    """[N, options] summed log-likelihood of each option's continuation tokens after the context."""
    items = [(i, j) for i, e in enumerate(encoded) for j in range(len(e.options))]
    seqs = [encoded[i].context + encoded[i].options[j] for i, j in items]
    k = max(len(e.options) for e in encoded)
    out = np.full((len(encoded), k), np.nan)
    device = _device(model)
    for rows in _batches([len(s) for s in seqs], batch_size):
        x, mask = _left_padded([seqs[r][:-1] for r in rows], pad_id, device)
        n = [len(encoded[items[r][0]].options[items[r][1]]) for r in rows]
        keep = max(n)
        target = torch.zeros((len(rows), keep), dtype=torch.long)
        valid = torch.zeros((len(rows), keep), dtype=torch.bool)
        for b, r in enumerate(rows):
            i, j = items[r]
            target[b, keep - n[b]:] = torch.tensor(encoded[i].options[j])
            valid[b, keep - n[b]:] = True
        logp = model(x, attention_mask=mask, logits_to_keep=keep).float().log_softmax(-1)
        picked = logp.gather(2, target.to(device)[..., None])[..., 0].double()
        sums = picked.masked_fill(~valid.to(device), 0).sum(1).cpu().numpy()
        for b, r in enumerate(rows):
            out[items[r]] = sums[b]
        bar.advance(task, len(rows))
    return out


def score_methods(model, tokenizer, questions: Sequence[Question], methods: Sequence[str] = ("letter",),
                  template: str | ChatTemplate | None = None, batch_size: int = 16,
                  progress: bool = False) -> dict[str, Results]:
    """Results of each method ("letter", "loglik", "loglik_norm"; the two loglik figures share one pass).

    template: None (or "none") is the benchmark's plain prompt (base models); "default" the tokenizer's own chat
    template; or a template name / ChatTemplate (chat models). The model is put in eval mode for the passes and
    returned to the mode it was in (the trainer calls this mid-training)."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown scoring method {', '.join(bad)}; known: {', '.join(METHODS)}")
    if not questions:
        raise ValueError("no questions to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tpl = _resolve_template(template, tokenizer)
    window = _config(model).max_position_embeddings
    passes = [p for p in ("letter", "loglik") if any(m.startswith(p) for m in methods)]
    results: dict[str, Results] = {}
    was_training = model.training
    model.eval()
    try:
        for kind in passes:
            cloze = kind == "loglik"
            asked = [q for q in questions if not cloze or all(q.choices)]  # GAOKAO options not found: no texts
            if not asked:
                raise ValueError("no question has its option texts (needed by loglik)")
            start = time.perf_counter()
            encoded = _encode(asked, tokenizer, tpl, cloze)
            _fit(asked, encoded, tokenizer, tpl, cloze, window)
            if not cloze:
                _check_letters(asked, encoded)
            with progress_bar(progress) as bar:
                rows = len(asked) if not cloze else sum(len(e.options) for e in encoded)
                task = bar.add_task(f"{asked[0].task} {kind}", total=rows)
                with sdpa_kernel(DECODE_SDPA_BACKENDS):  # shapes change every batch: no per-shape kernel plans
                    fn = _letter_scores if not cloze else _loglik_scores
                    scores = fn(model, encoded, tokenizer.pad_id, batch_size, bar, task)
            seconds = time.perf_counter() - start
            info = {"template": tpl.name if tpl else "none", "shots": max(len(q.shots) for q in questions),
                    "seconds": seconds,
                    "shots_dropped": sum(len(q.shots) - e.shots for q, e in zip(asked, encoded)),
                    "truncated": sum(e.truncated for e in encoded),
                    "skipped_no_option_text": len(questions) - len(asked)}
            names = ["letter"] if not cloze else [m for m in ("loglik", "loglik_norm") if m in methods]
            for name in names:
                s = scores
                if name == "loglik_norm":
                    lengths = np.array([[len(c) or 1 for c in q.choices] + [1] * (s.shape[1] - len(q.choices))
                                        for q in asked], dtype=np.float64)
                    s = scores / lengths
                results[name] = aggregate(asked, _argmax(s), name, scores=scores, **info)
    finally:
        model.train(was_training)
    return {m: results[m] for m in methods}


def score(model, tokenizer, questions: Sequence[Question], method: str = "letter",
          template: str | ChatTemplate | None = None, batch_size: int = 16, progress: bool = False) -> Results:
    """Score the questions with one method ("letter", "loglik" = acc, "loglik_norm" = acc_norm); see score_methods."""
    return score_methods(model, tokenizer, questions, [method], template, batch_size, progress)[method]


def _argmax(scores: np.ndarray) -> np.ndarray:
    """The first largest score per row, NaN (a missing option) never chosen."""
    return np.nan_to_num(scores, nan=-np.inf).argmax(1)


def _check_letters(questions: Sequence[Question], encoded: Sequence[_Encoded]) -> None:
    for q, e in zip(questions, encoded):
        firsts = [o[0] if o else None for o in e.options]
        if None in firsts or len(set(firsts)) != len(firsts):
            raise ValueError(f"{q.source}: the letters {LETTERS[:len(firsts)]} do not continue this prompt with "
                             f"distinct tokens (first tokens {firsts}); score with method loglik instead")


# ---- figures ---------------------------------------------------------------------------------------------------------
def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class Score:
    """One row of a result table: n questions, correct ones, chance (mean 1/k) and the macro average."""

    name: str
    n: int
    correct: int
    chance: float
    subjects: int = 1
    macro: float | None = None
    categories: tuple[str, ...] = ()
    name_zh: str | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def centered_of(self, acc: float) -> float:
        return (acc - self.chance) / (1 - self.chance)

    @property
    def centered(self) -> float:
        """(acc - chance) / (1 - chance): 0 at chance, 1 when every answer is right."""
        return self.centered_of(self.accuracy)

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    @property
    def centered_ci95(self) -> tuple[float, float]:
        lo, hi = self.ci95
        return self.centered_of(lo), self.centered_of(hi)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name}
        if self.name_zh:
            row["name_zh"] = self.name_zh
        if self.categories:
            row["categories"] = list(self.categories)
        row |= {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": list(self.ci95),
                "centered_accuracy": self.centered, "centered_ci95": list(self.centered_ci95), "chance": self.chance}
        if self.macro is not None:
            row |= {"subjects": self.subjects, "macro_accuracy": self.macro}
        return row


@dataclass
class Results:
    """A benchmark scored one way: the overall row, one per category (the benchmark's order) and one per subject,
    and each question's prediction (`questions`: subject, id, answer, prediction, correct, scores)."""

    task: str
    method: str
    split: str | None
    overall: Score
    categories: list[Score]
    subjects: list[Score]
    questions: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def questions_per_second(self) -> float | None:
        seconds = self.info.get("seconds")
        return self.overall.n / seconds if seconds else None

    def to_dict(self, predictions: bool = False) -> dict[str, Any]:
        out = {"task": self.task, "method": self.method, "split": self.split, **self.info,
               "questions_per_second": self.questions_per_second, "overall": self.overall.to_dict(),
               "categories": [c.to_dict() for c in self.categories], "subjects": [s.to_dict() for s in self.subjects]}
        if predictions:
            out["questions"] = self.questions
        return out


def aggregate(questions: Sequence[Question], predictions: Sequence[int], method: str = "given",
              scores: np.ndarray | None = None, split: str | None = None, **info: Any) -> Results:
    """Results of predicted option indices (one per question): per subject, per category (a question counts in each
    of its subject's categories) and overall."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    if not questions:
        raise ValueError("no questions")
    by_subject: dict[str, list[tuple[Question, bool]]] = defaultdict(list)
    rows = []
    for i, (q, p) in enumerate(zip(questions, predictions)):
        p = int(p)
        hit = p == q.answer
        by_subject[q.subject].append((q, hit))
        row = {"subject": q.subject, "id": q.id, "answer": q.letter, "prediction": LETTERS[p], "correct": hit}
        if scores is not None:
            row["scores"] = [None if math.isnan(v) else float(v) for v in scores[i][:len(q.choices)]]
        rows.append(row)

    def summary(name: str, items: list[tuple[Question, bool]], subjects: list[Score] | None = None,
                **extra: Any) -> Score:
        chance = sum(1 / len(q.choices) for q, _ in items) / len(items)
        s = Score(name, len(items), sum(h for _, h in items), chance, **extra)
        if subjects is not None:
            s.subjects, s.macro = len(subjects), sum(x.accuracy for x in subjects) / len(subjects)
        return s

    task = questions[0].task
    subjects = [summary(s, items, categories=items[0][0].categories, name_zh=items[0][0].name_zh)
                for s, items in by_subject.items()]
    categories = []
    for cat in BENCHMARKS[task].categories:
        members = [s for s in subjects if cat in s.categories]
        if members:
            items = [it for s in members for it in by_subject[s.name]]
            categories.append(summary(cat, items, members))
    overall = summary("Overall", [it for items in by_subject.values() for it in items], subjects)
    return Results(task, method, split or None, overall, categories, subjects, rows, info)


# ---- the whole thing, and the report ---------------------------------------------------------------------------------
def evaluate_task(model, tokenizer, task: str, data_dir: str | Path, split: str | None = None,
                  methods: Sequence[str] = ("letter",), shots: int = 0, subjects: Sequence[str] | None = None,
                  limit: int | None = None, template: str | ChatTemplate | None = None, batch_size: int = 16,
                  progress: bool = False) -> dict[str, Results]:
    """load_questions + score_methods: what `train.py eval --task` and the trainer's periodic evaluation run."""
    questions = load_questions(task, data_dir, split, subjects, limit, shots)
    results = score_methods(model, tokenizer, questions, methods, template, batch_size, progress)
    for r in results.values():
        r.split = split or BENCHMARKS[task].default_split
        r.info |= {f"skipped_{k}": v for k, v in questions.skipped.items()}
    return results


def print_results(results: dict[str, Results], console=None, title: str = "") -> None:
    """One rich table per method: the categories and the overall row, with chance stated."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    for name, r in results.items():
        bench = BENCHMARKS[r.task]
        shots = r.info.get("shots")
        table = Table(title=f"{bench.title} {r.split or ''} · {'' if shots is None else f'{shots}-shot · '}"
                            f"method {name} · template {r.info.get('template', 'none')}{title}",
                      caption=f"chance = {pct(r.overall.chance)}% (centered 0); macro = mean of subject accuracies, "
                              "the benchmark's own average")
        for column in ("category", "subjects", "n", "acc %", "95% CI", "centered %", "macro %"):
            table.add_column(column, justify="left" if column == "category" else "right", no_wrap=True)
        for s in [*r.categories, r.overall]:
            lo, hi = s.ci95
            table.add_row(s.name, str(s.subjects), f"{s.n:,}", pct(s.accuracy), f"{100 * lo:.1f}-{100 * hi:.1f}",
                          pct(s.centered), pct(s.macro) if s.macro is not None else "",
                          style="bold" if s is r.overall else None)
        console.print(table)
        notes = {k: v for k, v in r.info.items() if (k in ("shots_dropped", "truncated") or k.startswith("skipped"))
                 and v}
        if notes:
            console.print("  " + ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in notes.items()))
        if r.questions_per_second:
            console.print(f"  {r.overall.n:,} questions in {r.info['seconds']:.1f} s "
                          f"({r.questions_per_second:,.1f} questions/s)")


def write_predictions(path: str | Path, results: dict[str, Results]) -> None:
    """One JSON line per question: subject, id, answer, and each method's prediction, correctness and scores."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for name, r in results.items():
        for row in r.questions:
            entry = merged.setdefault((row["subject"], row["id"]), {"subject": row["subject"], "id": row["id"],
                                                                   "answer": row["answer"], "methods": {}})
            entry["methods"][name] = {k: row[k] for k in ("prediction", "correct", "scores") if k in row}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for entry in merged.values():
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
