"""Normalization and filters: per-corpus cleaning rules as configurable defaults.

- Punctuation runs collapse only when they contain a full-width separator (，。！？；：、), so `。。。` and `！？`
  become one mark while ASCII runs such as `...`, `?!` and `::` (code, prose) stay; quotes and brackets never do;
- only whitespace between two CJK characters becomes `，` (English and code keep their spaces); other space runs
  collapse only inside a line, so indentation is kept;
- lines and paragraphs are kept (only 3+ newlines become 2);
- en->zh punctuation leaves digits alone (decimal points, thousands separators);
- Dice similarity of two empty strings is 0;
- BELLE's `input` is part of the prompt (see corpora.py); the translation filter matches TRANSLATION_WORDS;
- lengths have one cap (max_len): cut or drop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the readers' record type (utils.corpora imports this module)
    from utils.corpora import Record

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = f"[{CJK}]"

# a run of separators collapses to its first full-width one when it has one ("，，" -> "，", "。！" -> "。",
# "?？" -> "？"); pure ASCII runs ("...", "?!", "::") are left alone
_FULL_SEPARATORS = "，。！？；：、"
_SEPARATORS = _FULL_SEPARATORS + ",.!?;:"
_SEP = f"[{re.escape(_SEPARATORS)}]"
_SEP_RUN = re.compile(f"(?:{_SEP}+[{_FULL_SEPARATORS}]|[{_FULL_SEPARATORS}]{_SEP}){_SEP}*")  # 2+, one full-width
_FULL_SEP = re.compile(f"[{_FULL_SEPARATORS}]")
_LONG_ELLIPSIS = re.compile(f"…{{3,}}|(?<={_CJK_CHAR})\\.{{3,}}")
_LONG_DASH = re.compile(r"—{3,}")
_TILDE_RUN = re.compile(r"([~～])[~～]+")
_CJK_SPACE = re.compile(f"(?<={_CJK_CHAR})[ \t\u3000\u00a0]+(?={_CJK_CHAR})")
_HAS_SPACE = re.compile(r"[ \t\u3000\u00a0]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t\u3000\u00a0]{2,}(?=\S)")  # inside a line: never indentation
_TRAILING_SPACES = re.compile(r"[ \t\u3000\u00a0]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")
_EN_PUNCT = re.compile(r"[,!;:?.]")
_IS_CJK = re.compile(_CJK_CHAR)
_EN_PUNCT_TO_ZH = str.maketrans({",": "，", "!": "！", ";": "；", ":": "：", "?": "？", ".": "。"})
_PARENS = re.compile(f"\\(([^()\\n]*{_CJK_CHAR}[^()\\n]*)\\)")

TRANSLATION_WORDS = ("translate", "翻译", "英译", "译英", "中译", "译中", "汉译", "译汉")
_TRANSLATION = re.compile("|".join(TRANSLATION_WORDS), re.IGNORECASE)
_TABLE = re.compile(r"-----|\|\s*:?-{3,}|-{3,}:?\s*\|")


def dice(a: str, b: str) -> float:
    """Dice coefficient over character sets (0 for two empty strings)."""
    sa, sb = set(a), set(b)
    total = len(sa) + len(sb)
    return 2 * len(sa & sb) / total if total else 0.0


def merge_title(title: str, body: str, threshold: float, keep: str = "title") -> str:
    """Title/question rule: when the two say the same thing (Dice >= threshold) keep one of them
    (`keep` = "title" for baike, "body" for medical), otherwise ask both, title first."""
    title, body = title.strip(), body.strip()
    if not title or not body:
        return title or body
    if dice(title, body) >= threshold:
        return title if keep == "title" else body
    return f"{title}\n{body}"


def normalize_punctuation(text: str) -> str:
    """Collapse repeated full-width separators, tidy whitespace inside lines, keep indentation and paragraphs (see
    the module docstring for the rules). Each pass runs only when its trigger character is present: this is
    the hot loop of `prepare`. A one-line text is stripped; a longer one keeps its first line's indentation."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _HAS_SPACE.search(text):
        text = _CJK_SPACE.sub("，", text)
        text = _INNER_SPACES.sub(" ", text)
        text = _TRAILING_SPACES.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    if "……" in text or "..." in text:
        text = _LONG_ELLIPSIS.sub("……", text)
    text = _SEP_RUN.sub(_collapse_separators, text)
    if "———" in text:
        text = _LONG_DASH.sub("——", text)
    if "~" in text or "～" in text:
        text = _TILDE_RUN.sub(r"\1", text)
    return text.lstrip("\n").rstrip() if "\n" in text.strip() else text.strip()


def _collapse_separators(m: re.Match) -> str:
    return _FULL_SEP.search(m.group()).group()


def en_to_zh_punctuation(text: str) -> str:
    """ASCII `,.!?;:` next to a CJK character -> full width (never decimal points, times or thousands separators);
    `(...)` around CJK -> `（...）`.
    Applied to wiki text only (clean_wiki_text)."""
    def zh(m: re.Match) -> str:
        i, ch = m.start(), m.group()
        before = text[i - 1] if i else ""
        after = text[i + 1] if i + 1 < len(text) else ""
        if _IS_CJK.match(before) or (_IS_CJK.match(after) and not (ch in ".:" and before.isdigit())):
            return ch.translate(_EN_PUNCT_TO_ZH)
        return ch
    return _PARENS.sub(r"（\1）", _EN_PUNCT.sub(zh, text))


def is_translation_task(prompt: str) -> bool:
    return _TRANSLATION.search(prompt) is not None


def has_table(prompt: str, response: str) -> bool:
    """Table rule: `表格` in the prompt, or `-----` or a markdown table rule (`|---`) in either field."""
    return "表格" in prompt or _TABLE.search(prompt) is not None or _TABLE.search(response) is not None


# (min prompt chars, min response chars) per corpus (3 / 3 for the rest). Instruction formats need only non-empty
# fields: their short answers ("没有", a label) are valid.
SEED_MIN_LENGTHS: dict[str, tuple[int, int]] = {
    "webtext": (3, 15), "baike": (3, 15), "medical": (3, 15), "zhihu": (4, 10), "belle": (3, 5),
    "instruct": (1, 1), "alpaca": (1, 1), "sharegpt": (1, 1), "qa": (1, 1), "hc3": (1, 1),
}


@dataclass
class CleanConfig:
    normalize: bool = True                      # normalize_punctuation on both fields
    min_lengths: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(SEED_MIN_LENGTHS))
    default_min_lengths: tuple[int, int] = (3, 3)
    max_len: int = 512                          # per field, in characters
    overlong: str = "cut"                       # "cut" to max_len or "drop"
    drop_translation: tuple[str, ...] = ("belle",)  # corpora whose translation tasks are dropped
    drop_tables: tuple[str, ...] = ("belle",)       # corpora whose tables are dropped

    def __post_init__(self) -> None:
        if self.overlong not in ("cut", "drop"):
            raise ValueError(f"overlong must be 'cut' or 'drop', got {self.overlong!r}")


def clean_record(rec: Record, corpus: str, cfg: CleanConfig) -> str | None:
    """Clean `rec` in place; return the reason it must be dropped, or None to keep it."""
    if corpus in cfg.drop_translation and is_translation_task(rec.prompt):
        return "translation"
    if corpus in cfg.drop_tables and has_table(rec.prompt, rec.response):
        return "table"
    if cfg.normalize:
        rec.prompt = normalize_punctuation(rec.prompt)
        rec.response = normalize_punctuation(rec.response)
    else:
        rec.prompt, rec.response = rec.prompt.strip(), rec.response.strip()
    min_prompt, min_response = cfg.min_lengths.get(corpus, cfg.default_min_lengths)
    if len(rec.prompt) < min_prompt:
        return "short_prompt"
    if len(rec.response) < min_response:
        return "short_response"
    if len(rec.prompt) > cfg.max_len or len(rec.response) > cfg.max_len:
        if cfg.overlong == "drop":
            return "too_long"
        rec.prompt, rec.response = rec.prompt[:cfg.max_len], rec.response[:cfg.max_len]
    return None
