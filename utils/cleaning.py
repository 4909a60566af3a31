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

Prose (the `text` format) gets its own rules, which change no character of the text itself: line breaks made `\n`,
control characters removed, Unicode NFC, trailing spaces and runs of blank lines trimmed (`normalize_text`); then a
long document is split into pieces at paragraph ends (`split_document`), each piece one row (`text_fields`). None
of the question/answer rules above (punctuation, lengths, translation, tables) applies to it.
"""
from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
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
_SEP_RUN = re.compile(f"{_SEP}{{2,}}")  # (starts with a class: re scans for it fast) collapsed if one is full-width
_FULL_SEP = re.compile(f"[{_FULL_SEPARATORS}]")
_LONG_ELLIPSIS = re.compile(f"…{{3,}}|(?<={_CJK_CHAR})\\.{{3,}}")
_LONG_DASH = re.compile(r"—{3,}")
_TILDE_RUN = re.compile(r"([~～])[~～]+")
_CJK_SPACE = re.compile(f"(?<={_CJK_CHAR})[ \t\u3000\u00a0]+(?={_CJK_CHAR})")
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
    if " " in text or "\t" in text or "\u3000" in text or "\u00a0" in text:  # (faster than one regex search)
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
    full = _FULL_SEP.search(m.group())
    return full.group() if full else m.group()


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


# text format: characters per piece, about 730 tokens of a 32k BPE on Chinese prose (1.36 characters a token); the
# pretraining packer continues a piece that overflows a row in the next row, so the length only bounds a row's text
MAX_DOC_CHARS = 1000

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
    max_doc_chars: int = MAX_DOC_CHARS          # text format: the longest piece a document is split into
    overlong: str = "cut"                       # "cut" to max_len or "drop"
    drop_translation: tuple[str, ...] = ("belle",)  # corpora whose translation tasks are dropped
    drop_tables: tuple[str, ...] = ("belle",)       # corpora whose tables are dropped

    def __post_init__(self) -> None:
        if self.overlong not in ("cut", "drop"):
            raise ValueError(f"overlong must be 'cut' or 'drop', got {self.overlong!r}")
        if self.max_doc_chars < 1:
            raise ValueError(f"max_doc_chars must be at least 1, got {self.max_doc_chars}")


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


# ----------------------------------------------------------------------------------------------- prose (text format)

_LINE_BREAK = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")  # CR LF, CR, VT, FF, NEL, LS, PS -> \n
# C0 but tab and LF, DEL, C1 (but NEL), BOM / zero width no-break space, zero width space, word joiner, noncharacters
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u2060\ufeff\ufffe\uffff]")
_TRAILING_WS = re.compile(r"[ \t\u3000\u00a0]+(?=\n|\Z)")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")
_PARAGRAPH_BREAK = re.compile(r"\n+")
# a sentence end: 。！？!? (or an ellipsis, or a full stop before a space) and the closing quotes or brackets after it
_SENTENCE_END_RUN = re.compile("(?:[。！？!?]|……|\\.(?=\\s))[”’」』）)】》\"']*")


def normalize_text(text: str, normalize: bool = True) -> str:
    """A prose document cleaned for pretraining, its words untouched: every line break becomes `\\n` and control
    characters (C0 but tab and newline, DEL, C1, BOM / zero-width no-break space, zero-width space, word joiner) are
    removed; with `normalize`, also Unicode NFC (never NFKC: it would turn full-width ，。 into ASCII), spaces at
    line ends removed and runs of blank lines cut to one. Leading blank lines and trailing white space go; the
    indentation of lines (full-width spaces in Chinese prose) stays. Empty: nothing but white space was left."""
    if _LINE_BREAK.search(text):
        text = _LINE_BREAK.sub("\n", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if normalize:
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        text = _TRAILING_WS.sub("", text)
        if "\n\n\n" in text:
            text = _BLANK_LINES.sub("\n\n", text)
    text = _LEADING_BLANK_LINES.sub("", text).rstrip()
    return text


@dataclass
class Split:
    """A document's pieces and how many cuts of each kind made them (paragraph end, sentence end, anywhere)."""
    pieces: list[str]
    paragraph: int = 0
    sentence: int = 0
    hard: int = 0


def split_document(text: str, max_chars: int) -> Split:
    """Cut a (normalized) document into pieces of at most `max_chars` characters, in order.

    A cut goes at a paragraph end (a line break), the first one past an even share of the document
    (len / ceil(len / max_chars)) that keeps the piece within `max_chars`, so the pieces come out about equally long;
    the line break(s) at a cut are left out. A paragraph longer than `max_chars` is cut at its last sentence end
    (。！？!?…… and closing quotes) that fits, and a sentence longer than that is cut at `max_chars`; spaces at such a
    cut are left out. So the pieces are substrings of `text`, in order, and what lies between two of them is white
    space only: `"".join(pieces)` is `text` less the white space at the cuts."""
    n = len(text)
    if n <= max_chars:
        return Split([text] if text else [])
    breaks = [(m.start(), m.end()) for m in _PARAGRAPH_BREAK.finditer(text)]
    starts = [b for b, _ in breaks]
    target = -(-n // -(-n // max_chars))  # an even share: n / (the fewest pieces)
    out = Split([])
    a = 0
    while n - a > max_chars:
        limit = a + max_chars
        lo, hi = bisect_right(starts, a), bisect_right(starts, limit) - 1  # breaks inside (a, limit]
        if lo <= hi:
            j = min(bisect_left(starts, a + target, lo, hi + 1), hi)
            end, nxt = breaks[j]
            out.paragraph += 1
        else:
            end = 0
            for m in _SENTENCE_END_RUN.finditer(text, a, limit):
                end = m.end()
            if end > a:
                out.sentence += 1
            else:
                end = limit
                out.hard += 1
            nxt = end
            while nxt < n and text[nxt] in " \t\u3000\u00a0":
                nxt += 1
        piece = text[a:end].rstrip()
        if piece.strip():
            out.pieces.append(piece)
        a = nxt
    if text[a:].strip():
        out.pieces.append(text[a:])
    return out


def text_fields(piece: str) -> tuple[str, str]:
    """The (prompt, response) row of a text piece: its first line and the rest. The loaders build a pretraining
    document as prompt + "\\n" + response, which is the piece itself whenever it holds a line break; a one-line piece
    is (piece, "") and gains a trailing "\\n" there (see `text_of`)."""
    prompt, _, response = piece.partition("\n")
    return prompt, response


def text_of(prompt: str, response: str) -> str:
    """A text piece back from its row (the inverse of `text_fields`)."""
    return f"{prompt}\n{response}" if response else prompt
