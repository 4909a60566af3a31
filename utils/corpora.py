"""One streaming reader per raw corpus format -> `Record`s, and a registry by name.

A reader is `fn(path, opts, tally) -> Iterator[Record]` for one file. It never holds the file in memory, and it
never raises on bad input: a malformed line, undecodable bytes or a missing field is counted in `tally` with its
file and line, and the reader goes on. `read_corpus` expands a directory into the files its reader understands.
Later stages (LoRA instruction data) reuse `READERS` / `read_corpus` / `read_file`.

The `text` reader (plain prose for pretraining) yields one record per document, its text in `response`; `prepare`
cleans it and splits it into pieces (utils/cleaning.py).
"""
from __future__ import annotations

import codecs
import csv
import fnmatch
import json
import re
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from utils.cleaning import en_to_zh_punctuation, merge_title


@dataclass(slots=True)
class Record:
    prompt: str
    response: str
    source: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (q, a) turns, oldest first
    system: str = ""
    continued: bool = False  # text format: this record goes on with the previous record's document (a long file)
    # instruction formats (belle, alpaca, instruct) whose prompt is instruction + "\n" + input: the raw instruction,
    # so that dedup can leave out one that many records share (utils/prepare.py); "" when there is no separate input
    instruction: str = ""


@dataclass
class Tally:
    """Rows read and dropped by reason, with the first few examples of each reason (file:line and a detail)."""
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    max_examples: int = 3
    counts: Counter = field(default_factory=Counter)  # other numbers of a stage (text: documents split, pieces)

    def drop(self, reason: str, where: str = "", detail: str = "") -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] <= self.max_examples:
            self.examples.append({"reason": reason, "where": where, "detail": detail[:200]})


@dataclass
class ReaderOptions:
    encoding: str | None = None      # None: detect (BOM, then strict UTF-8, then GB18030)
    min_star: int = 5                # webtext: drop answers with fewer stars
    dice_threshold: float = 0.9      # baike / medical: title and question merge rule
    hc3_answers: str = "both"        # hc3: "human", "chatgpt" or "both"
    wiki_max_chars: int = 512        # wiki: answer = first paragraphs up to this many characters
    seed: int = 23333                # wiki: question template choice
    text_field: str = "text"         # text: the field / column holding a document (JSON lines, parquet)
    doc_sep: str = "file"            # text, plain files: "file" (one document), "blank" (blank lines) or a line

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must name a field")
        if not self.doc_sep.strip():
            raise ValueError("doc_sep must be 'file', 'blank' or a separator line, got an empty string")


# drop reasons that judge content rather than readability (a file holding only these is still readable)
FILTER_REASONS = {"low_star"}

Reader = Callable[[Path, ReaderOptions, Tally], Iterator[Record]]


@dataclass(frozen=True)
class ReaderSpec:
    fn: Reader
    patterns: tuple[str, ...]        # which files of a directory this reader takes
    prose: bool = False              # records are whole documents to clean and split (the text format)
    skip: tuple[str, ...] = ()       # file names (glob) a directory's listing leaves out


READERS: dict[str, ReaderSpec] = {}
JSON_PATTERNS = ("*.json", "*.jsonl", "*.txt")
READ_BUFFER = 1 << 22


def register(name: str, patterns: tuple[str, ...] = JSON_PATTERNS, prose: bool = False,
             skip: tuple[str, ...] = ()) -> Callable[[Reader], Reader]:
    def wrap(fn: Reader) -> Reader:
        READERS[name] = ReaderSpec(fn, patterns, prose, skip)
        return fn
    return wrap


# ----------------------------------------------------------------------------------------------- low-level input

def detect_encoding(path: Path, sample_bytes: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    for enc in ("utf-8", "gb18030"):
        try:
            codecs.getincrementaldecoder(enc)().decode(head, final=False)
            return enc
        except UnicodeDecodeError:
            continue
    return "utf-8"  # mostly undecodable: every bad line is counted


def text_lines(path: Path, opts: ReaderOptions, tally: Tally, count_read: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for each line that decodes; the others are counted as `undecodable` (and as read
    rows unless `count_read` is off: for the text reader a line is not a row)."""
    enc = opts.encoding or detect_encoding(path)
    # big reads: every read releases the GIL, and getting it back from the hashing thread can cost a switch interval
    with open(path, "rb", buffering=READ_BUFFER) as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode(enc)
            except UnicodeDecodeError as e:
                tally.read += count_read
                tally.drop("undecodable", f"{path}:{n}", f"{enc}: {e.reason} at byte {e.start}")


_RAW_DECODE = json.JSONDecoder().raw_decode


def _loads(line: str) -> Any:
    """json.loads of a stripped line without its per-call overhead (a third of its time on short lines): the same
    object, or the same error."""
    if line.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", line, 0)
    obj, end = _RAW_DECODE(line)
    if end != len(line):
        raise json.JSONDecodeError("Extra data", line, end)
    return obj


def json_objects(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[tuple[str, dict]]:
    """Objects of a JSON-lines file or of a top-level JSON array (streamed), each with its `file:line`."""
    enc = opts.encoding or detect_encoding(path)
    with open(path, "rb") as f:
        head = f.read(4096).decode(enc, errors="ignore").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        yield from _json_array(path, enc, tally)
        return
    name = str(path)
    for n, line in text_lines(path, opts, tally):
        line = line.strip()
        if not line:
            continue
        tally.read += 1
        try:
            obj = _loads(line)
        except ValueError as e:
            tally.drop("bad_json", f"{name}:{n}", str(e))
            continue
        if not isinstance(obj, dict):
            tally.drop("not_an_object", f"{name}:{n}", type(obj).__name__)
            continue
        yield f"{name}:{n}", obj


_ITEM_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{}\[\],"]')  # a JSON string never holds a raw newline
# a "string" that ends in `}, {`: its quotes are the closing quote of one item and the opening quote of the next
# item's first key, paired by the scanner because a stray quote shifted the pairing of every later quote
_MISPAIRED = re.compile(r'\}\s*,\s*(?=\{\s*"$)')
_BOUNDARY = re.compile(r'\}\s*,\s*(?=\{\s*["}])')  # where one object item ends and the next begins
RESYNC_CHARS = 1 << 20


class _ItemScan:
    """Where a scan of a malformed item stands: the brackets open in it, and whether a closing bracket ever
    mismatched the open one (the brackets are broken, so their depth says little about where the item ends)."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.mismatched = False


def _item_end(buf: str, i: int, state: _ItemScan) -> tuple[int | None, int]:
    """Scan a malformed array item from buf[i] (strings skipped) for the `,` outside its brackets that ends it.
    Returns (index where the next item may start, or None when buf ends first; where to resume scanning after more
    text is appended). Quotes that cannot be paired are recovered from: a quote with no closing quote before the end
    of its line is a stray one and is passed over, and a "string" that runs from one item's last quote to the next
    item's first (`"}, {"`, the pairing shifted by a stray quote on a single-line array) ends the item there; so one
    broken string cannot hide every later item's brackets inside "strings". A closing bracket with nothing open is a
    stray one (the array's own `]` after a broken last item is one); one of the other kind closes the open one."""
    for m in _ITEM_TOKEN.finditer(buf, i):
        tok = m.group()
        if tok == '"':
            if buf.find("\n", m.end()) >= 0:  # the line ends before any closing quote: a stray quote
                continue
            return None, m.start()  # the string may close in the next chunk: resume from its quote
        if tok[0] == '"':
            if len(tok) > 2 and (b := _MISPAIRED.search(tok, 1)):
                state.open.clear()
                return m.start() + b.end(), m.start() + b.end()
            continue
        if tok in "{[":
            state.open.append(tok)
        elif tok in "}]":
            if state.open:
                state.mismatched |= state.open.pop() != "{["["}]".index(tok)]
            elif tok == "}":
                state.mismatched = True
        elif not state.open:  # a `,` outside every bracket
            return m.end(), m.end()
    return None, len(buf)


def _json_array(path: Path, enc: str, tally: Tally, chunk_chars: int = 1 << 20,
                resync_chars: int = RESYNC_CHARS) -> Iterator[tuple[str, dict]]:
    """Stream the items of `[ {...}, {...} ]` with raw_decode over a sliding buffer (no whole-file load). An item
    that fails to parse is read further only when the error is at the end of the buffer (it may continue in the
    next chunk); otherwise it is counted as one bad_json, with its line, its number in the array and its character
    offset, and skipped: to the `,` that ends it at bracket depth 0 (see `_item_end`); or, when its brackets do not
    balance (no such `,` within `resync_chars` of the next `}, {` boundary, or before the end of the file), to that
    `}, {` boundary after the error. So a broken item costs only itself, on one line as on many."""
    decoder = json.JSONDecoder()
    with open(path, encoding=enc, errors="strict") as f:
        buf, pos, eof, line, started, broken, base, items = "", 0, False, 1, False, False, 0, 0

        def refill() -> bool:
            """Drop the consumed text, append the next chunk; False at EOF or undecodable bytes (counted)."""
            nonlocal buf, pos, eof, broken, base
            try:
                more = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                tally.read += 1
                tally.drop("undecodable", f"{path}:{line}", f"{enc}: {e.reason}; rest of the array skipped")
                eof = broken = True
                return False
            base += pos
            buf, pos, eof = buf[pos:] + more, 0, not more
            return bool(more)

        def skip_bad(error: str, error_at: int) -> bool:
            """Count the item at buf[pos] as bad and move pos to where the next one may start; False when no later
            item can be found (the end of the file, or of the readable part)."""
            nonlocal pos, line, items
            tally.read += 1
            items += 1
            where, what = f"{path}:{line}", f"item {items} of the array: {error} at character {base + error_at:,}"
            scan, state, seek, anchor, resume = pos, _ItemScan(), max(error_at, pos), None, None
            start, last = base + pos, ""
            while True:
                nxt, scan = _item_end(buf, scan, state)
                if anchor is None:  # the first `}, {` after the error, kept in the buffer until the scan decides
                    end = len(buf) if nxt is None else max(seek, nxt - resync_chars)
                    if b := _BOUNDARY.search(buf, seek, end):
                        anchor = b.end()
                    else:
                        k = buf.rfind("}", seek, end)  # a boundary cut by the end of the buffer: look again
                        seek = k if k >= 0 and end - k < 4096 and not buf[k + 1:end].strip(" \t\r\n,{") else end
                if nxt is not None:
                    resume = anchor if anchor is not None and nxt - anchor > resync_chars else nxt
                    break
                if anchor is not None and scan - anchor > resync_chars:
                    resume = anchor
                    break
                drop = min(scan, seek) if anchor is None else anchor
                line += buf.count("\n", pos, drop)
                last = buf[pos:drop].rstrip()[-1:] or last
                pos, before = drop, base
                more = not eof and refill()
                shift = base - before
                scan, seek = scan - shift, seek - shift
                anchor = None if anchor is None else anchor - shift
                if not more:
                    last = buf[pos:].rstrip()[-1:] or last
                    if anchor is not None and (state.open or state.mismatched):  # broken brackets: the boundary
                        resume = anchor
                    break
            if resume is None:
                skipped = base + len(buf) - start
                tally.drop("bad_json", where, f"{what}; " + (
                    "it was the last item" if last == "]" and not state.open and not broken else
                    f"the rest of the array ({skipped:,} characters) skipped"))
                return False
            resume = max(resume, start - base + 1)  # always past at least one character
            line += buf.count("\n", pos, resume)
            pos = resume
            tally.drop("bad_json", where, f"{what}; skipped to the next item")
            return True

        while True:
            while pos < len(buf) and (buf[pos] in " \t\r\n,\ufeff" or (buf[pos] == "[" and not started)):
                started |= buf[pos] == "["
                line += buf[pos] == "\n"
                pos += 1
            if pos >= len(buf):
                if eof or not refill():
                    return
                continue
            if buf[pos] == "]":  # the end of the array, unless more than white space follows it
                k = pos + 1
                while k < len(buf) and buf[k] in " \t\r\n":
                    k += 1
                if k < len(buf):
                    if not skip_bad("unexpected ']' before the end of the file", pos):
                        return
                    continue
                if eof or not refill():
                    return
                continue
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                truncated = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
                if truncated and not eof:
                    if refill():
                        continue
                    if broken:  # undecodable bytes: counted, the rest is unreadable
                        return
                if not skip_bad(e.msg, e.pos):
                    return
                continue
            tally.read += 1
            items += 1
            where = f"{path}:{line}"
            line += buf.count("\n", pos, end)
            pos = end
            if isinstance(obj, dict):
                yield where, obj
            else:
                tally.drop("not_an_object", where, type(obj).__name__)


def _text(obj: dict, key: str) -> str:
    """A field as text: strings as they are, numbers as str, None / missing as ''."""
    v = obj.get(key)
    if v is None:
        return ""
    return v if isinstance(v, str) else str(v)


def _require(obj: dict, keys: tuple[str, ...], where: str, tally: Tally) -> bool:
    for k in keys:  # the common case first: every field a non-blank string
        v = obj.get(k)
        if not (isinstance(v, str) and not v.isspace() and v):
            break
    else:
        return True
    missing = [k for k in keys if not _text(obj, k).strip()]
    if missing:
        tally.drop("missing_field", where, f"missing or empty: {', '.join(missing)}")
        return False
    return True


# ----------------------------------------------------------------------------------------------- readers

@register("webtext")
def read_webtext(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """webtext2019zh: title -> content; answers with `star` below `min_star` are dropped (`desc` is unused)."""
    for where, obj in json_objects(path, opts, tally):
        if not _require(obj, ("title", "content"), where, tally):
            continue
        try:
            star = int(obj.get("star") or 0)
        except (TypeError, ValueError):
            tally.drop("bad_field", where, f"star={obj.get('star')!r}")
            continue
        if star < opts.min_star:
            tally.drop("low_star", where, f"star={star}")
            continue
        yield Record(_text(obj, "title"), _text(obj, "content"), "webtext")


@register("baike")
def read_baike(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """baike_qa2019: title (+ desc unless Dice-similar) -> answer."""
    for where, obj in json_objects(path, opts, tally):
        if not _require(obj, ("title", "answer"), where, tally):
            continue
        prompt = merge_title(_text(obj, "title"), _text(obj, "desc"), opts.dice_threshold, keep="title")
        yield Record(prompt, _text(obj, "answer"), "baike")


MEDICAL_COLUMNS = ("title", "ask", "answer")  # the columns read; department is not


class _Lines:
    """Numbered physical lines for csv.reader. Lines given back (`pending`) are read again first, also after the
    file's end was reached once; `consumed` collects the lines read since the caller last cleared it."""

    def __init__(self, numbered: Iterator[tuple[int, str]]):
        self.numbered = numbered
        self.pending: deque[tuple[int, str]] = deque()
        self.consumed: list[tuple[int, str]] = []

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        n, line = self.pending.popleft() if self.pending else next(self.numbered)
        self.consumed.append((n, line))
        return line


def _starts_a_row(line: str, departments: set[str], column: int, width: int) -> bool:
    """Whether a line read inside a quoted field looks like the start of a row: a known department, all columns."""
    fields = line.split(",")
    return len(fields) >= width and fields[column].strip() in departments


@register("medical", patterns=("*.csv",))
def read_medical(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Toyhom medical dialogue CSV (department,title,ask,answer), GB18030 or UTF-8: title + ask (one of them when
    Dice-similar) -> answer. Quoted fields may span lines; a stray quote inside an unquoted field is literal. A quote
    that opens a field and never closes on its line would swallow the rows below it into that field: when a row that
    spans lines holds a line that starts like a row of its own (a department already seen, and all the columns), its
    first line is read with the quote as a literal character and the lines after it are read again as rows."""
    lines = _Lines(text_lines(path, opts, tally))
    consumed = lines.consumed
    rows = csv.reader(lines)
    header: list[str] | None = None
    departments: set[str] = set()
    dept: int | None = 0  # the department column (first without a header; None when a header has none)
    while True:
        consumed.clear()
        try:
            row, error = next(rows), None
        except StopIteration:
            return
        except csv.Error as e:  # a quote running on past csv's field size limit ends here too
            row, error = [], e
        width = len(header) if header is not None else 4
        if dept is not None and len(consumed) > 1 and any(
                _starts_a_row(text, departments, dept, width) for _, text in consumed[1:]):
            lines.pending.extendleft(reversed(consumed[1:]))
            del consumed[1:]
            row, error = next(csv.reader([consumed[0][1]], quoting=csv.QUOTE_NONE)), None
        if error is not None:
            tally.read += 1
            tally.drop("malformed_row", f"{path}:{consumed[-1][0]}", str(error))
            continue
        if not row or not any(c.strip() for c in row):
            continue
        if header is None and {c.strip().lower() for c in row} >= set(MEDICAL_COLUMNS):
            header = [c.strip().lower() for c in row]
            idx = {name: header.index(name) for name in MEDICAL_COLUMNS}
            dept = header.index("department") if "department" in header else None
            continue
        if dept is not None and len(row) > dept:
            departments.add(row[dept].strip())
        tally.read += 1
        where = f"{path}:{consumed[-1][0]}"
        if header is not None:
            if len(row) < len(header):
                tally.drop("missing_field", where, f"{len(row)} of {len(header)} columns")
                continue
            title, ask = row[idx["title"]], row[idx["ask"]]
            answer = "，".join(row[idx["answer"]:]) if idx["answer"] == len(header) - 1 else row[idx["answer"]]
        else:
            if len(row) < 4:
                tally.drop("missing_field", where, f"{len(row)} of 4 columns")
                continue
            title, ask, answer = row[1], row[2], "，".join(row[3:])  # an unquoted comma split the answer
        if ask.strip() in ("无", "无。"):
            ask = ""
        prompt = merge_title(title, ask, opts.dice_threshold, keep="body")
        if not prompt.strip() or not answer.strip():
            tally.drop("missing_field", where, "empty title/ask or answer")
            continue
        yield Record(prompt, answer, "medical")


def parquet_rows(path: Path, columns: list[str], tally: Tally, batch_rows: int = 8192) -> Iterator[tuple[str, dict]]:
    """`columns` of each row of a parquet file, streamed in batches, with its `file:row n`; an unreadable file or
    a missing column is counted."""
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        tally.read += 1
        tally.drop("bad_parquet", str(path), str(e))
        return
    names = set(f.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        tally.read += f.metadata.num_rows
        tally.dropped["missing_field"] += f.metadata.num_rows
        tally.examples.append({"reason": "missing_field", "where": str(path),
                               "detail": f"no column {missing}; its columns: {sorted(names)}"})
        return
    n = 0
    for batch in f.iter_batches(batch_size=batch_rows, columns=[c for c in columns if c in names]):
        for row in batch.to_pylist():
            n += 1
            tally.read += 1
            yield f"{path}:row {n}", row


@register("zhihu", patterns=("*.parquet",))
def read_zhihu(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Zhihu-KOL parquet: INSTRUCTION -> RESPONSE."""
    for where, row in parquet_rows(path, ["INSTRUCTION", "RESPONSE"], tally):
        if _require(row, ("INSTRUCTION", "RESPONSE"), where, tally):
            yield Record(row["INSTRUCTION"], row["RESPONSE"], "zhihu")


@register("parquet", patterns=("*.parquet",))
def read_parquet(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Our own prepared parquet (prompt, response[, source])."""
    for where, row in parquet_rows(path, ["prompt", "response"], tally):
        if _require(row, ("prompt", "response"), where, tally):
            yield Record(row["prompt"], row["response"], "parquet")


def _instruction(obj: dict, keys: tuple[str, str] = ("instruction", "input")) -> tuple[str, str]:
    """(prompt, instruction): prompt = instruction + input, one per line (without `input` many records lose their
    question); instruction = the instruction part when both parts are there, else "" (it is the whole question)."""
    parts = [_text(obj, k).strip() for k in keys]
    return "\n".join(p for p in parts if p), parts[0] if all(parts) else ""


@register("belle")
def read_belle(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """BELLE instruction / input / output (JSON lines or array)."""
    for where, obj in json_objects(path, opts, tally):
        prompt, instruction = _instruction(obj)
        if not prompt or not _require(obj, ("output",), where, tally):
            if not prompt:
                tally.drop("missing_field", where, "missing or empty: instruction")
            continue
        yield Record(prompt, _text(obj, "output"), "belle", instruction=instruction)


def _history(obj: dict, where: str, tally: Tally) -> list[tuple[str, str]] | None:
    hist = obj.get("history") or []
    if not isinstance(hist, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in hist):
        tally.drop("bad_field", where, "history must be a list of [question, answer] pairs")
        return None
    return [(str(q), str(a)) for q, a in hist]


@register("alpaca")
def read_alpaca(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """alpaca / LLaMA-Factory: instruction + input -> output, optional system and history [[q, a], ...]."""
    for where, obj in json_objects(path, opts, tally):
        prompt, instruction = _instruction(obj)
        if not prompt:
            tally.drop("missing_field", where, "missing or empty: instruction and input")
            continue
        if not _require(obj, ("output",), where, tally):
            continue
        history = _history(obj, where, tally)
        if history is not None:
            yield Record(prompt, _text(obj, "output"), "alpaca", history, _text(obj, "system"), instruction=instruction)


@register("instruct")
def read_instruct(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """taishan1994 instruct / query / answer: prompt = instruct + "\\n" + query."""
    for where, obj in json_objects(path, opts, tally):
        if not _require(obj, ("instruct", "answer"), where, tally):
            continue
        prompt, instruction = _instruction(obj, ("instruct", "query"))
        yield Record(prompt, _text(obj, "answer"), "instruct", instruction=instruction)


QA_KEYS = (("q", "a"), ("question", "answer"), ("question", "std_answer"), ("问", "答"), ("prompt", "response"))


@register("qa")
def read_qa(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Plain question/answer JSON: {"q","a"} (HC3 LoRA layout), {"question","answer"}, {"问","答"}, ..."""
    for where, obj in json_objects(path, opts, tally):
        for qk, ak in QA_KEYS:
            if qk in obj and ak in obj:
                if _require(obj, (qk, ak), where, tally):
                    yield Record(_text(obj, qk), _text(obj, ak), "qa")
                break
        else:
            tally.drop("missing_field", where, f"none of the key pairs {QA_KEYS}")


@register("hc3")
def read_hc3(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Original HC3: {"question", "human_answers": [...], "chatgpt_answers": [...]} -> one record per kept answer.
    HC3-Plus lines ({"text", "label"}) have no question, so they are counted as `no_question_hc3plus`."""
    if opts.hc3_answers not in ("human", "chatgpt", "both"):
        raise ValueError(f"hc3_answers must be human, chatgpt or both, got {opts.hc3_answers!r}")
    keys = {"human": ("human_answers",), "chatgpt": ("chatgpt_answers",)}.get(
        opts.hc3_answers, ("human_answers", "chatgpt_answers"))
    for where, obj in json_objects(path, opts, tally):
        if "question" not in obj and "text" in obj and "label" in obj:
            tally.drop("no_question_hc3plus", where, "HC3-Plus {text,label} record: no question to answer")
            continue
        if not _require(obj, ("question",), where, tally):
            continue
        answers = [a for k in keys for a in (obj.get(k) or []) if isinstance(a, str) and a.strip()]
        if not answers:
            tally.drop("missing_field", where, f"no non-empty {' / '.join(keys)}")
            continue
        for a in answers:
            yield Record(_text(obj, "question"), a, "hc3")


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bot": "assistant", "system": "system"}


def message_role(message: Any) -> str | None:
    """A message's role, user, assistant or system, from its "from" (ShareGPT's human, gpt, ...) or "role"; None
    for any other role and for a message that is not an object."""
    if not isinstance(message, dict):
        return None
    return _ROLES.get(str(message.get("from", message.get("role", ""))).lower())


@register("sharegpt")
def read_sharegpt(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """ShareGPT {"conversations": [{"from","value"}]} or {"messages": [{"role","content"}]}: the last
    user/assistant pair is prompt/response, earlier pairs are `history`, a leading system turn is `system`."""
    for where, obj in json_objects(path, opts, tally):
        turns = obj.get("conversations") or obj.get("messages")
        if not isinstance(turns, list) or not turns:
            tally.drop("missing_field", where, "no conversations / messages list")
            continue
        system, pairs, pending, ok = _text(obj, "system"), [], None, True
        for t in turns:
            if not isinstance(t, dict):
                ok = False
                break
            role = message_role(t)
            text = str(t.get("value", t.get("content", "")) or "")
            if role == "system":
                system = text
            elif role == "user" and pending is None:
                pending = text
            elif role == "assistant" and pending is not None:
                pairs.append((pending, text))
                pending = None
            else:
                ok = False
                break
        if not ok or not pairs:
            tally.drop("bad_field", where, "turns must alternate user / assistant")
            continue
        (q, a), history = pairs[-1], pairs[:-1]
        if not q.strip() or not a.strip():
            tally.drop("missing_field", where, "empty last question or answer")
            continue
        yield Record(q, a, "sharegpt", history, system)


# ----------------------------------------------------------------------------------------------- wiki

WIKI_TEMPLATES = (
    "什么是{}？", "介绍一下{}", "介绍一下什么是{}", "写一篇关于{}的介绍", "{}是什么？", "你知道{}吗？",
    "生成关于{}的介绍", "我想知道关于{}的详细信息", "你了解{}吗？", "请解释一下{}", "对于{}，你有什么了解或看法吗？",
    "请告诉我关于{}的信息",
    "请简要描述一下{}", "请提供有关{}的一些详细信息", "能否解释一下{}是什么？", "请分享一些关于{}的背景知识",
    "请简要概括一下{}", "能给我一些关于{}的背景资料吗？", "有关{}的信息可以分享一下吗？", "你能告诉我{}是什么吗？",
)
_DOC_OPEN = re.compile(r'<doc\b[^>]*\btitle="([^"]*)"[^>]*>')
_WIKI_QUOTES = str.maketrans({"「": "“", "」": "”", "『": "“", "』": "”", "｢": "“", "｣": "”"})
_WIKI_FIXES = ((re.compile(r"[，；]）"), "）"), (re.compile(r"[（(]，"), "（"), (re.compile(r"（）|\(\)"), ""))
_SENTENCE_END = re.compile(r"[。！？!?]")
_t2s = None


def to_simplified(text: str) -> str:
    global _t2s
    if _t2s is None:
        import opencc
        _t2s = opencc.OpenCC("t2s")
    return _t2s.convert(text)


def _wiki_articles(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[tuple[str, str, str]]:
    """(where, title, body text) from WikiExtractor --json lines or classic `<doc ...>` text."""
    lines = text_lines(path, opts, tally)
    first = next(lines, None)
    if first is None:
        return
    if first[1].lstrip("\ufeff").lstrip().startswith("{"):
        lines.close()  # JSON lines: read through the shared JSON reader instead
        for where, obj in json_objects(path, opts, tally):
            if _require(obj, ("title", "text"), where, tally):
                yield where, _text(obj, "title"), _text(obj, "text")
        return
    title, body, start = None, [], 0
    for n, line in ((first[0], first[1]), *lines):
        m = _DOC_OPEN.match(line.strip())
        if m:
            if title is not None:  # the previous article lacks its </doc>: it ends where this one begins
                yield f"{path}:{start}", title, "".join(body)
            title, body, start = m.group(1), [], n
            tally.read += 1
        elif line.strip() == "</doc>":
            if title is not None:
                yield f"{path}:{start}", title, "".join(body)
            title = None
        elif title is not None:
            body.append(line)
    if title is not None:
        tally.drop("truncated_article", f"{path}:{start}", "no closing </doc>")


def wiki_answer(title: str, text: str, max_chars: int) -> str:
    """The first paragraphs after the title line, up to max_chars; a first paragraph that is too long is cut at
    its last sentence end (mid-sentence only when it has none)."""
    paras = [p.strip() for p in text.split("\n") if p.strip()]
    if paras and paras[0] == title.strip():
        paras = paras[1:]
    out = ""
    for p in paras:
        if len(out) + len(p) + (1 if out else 0) > max_chars:
            if not out:
                cut = p[:max_chars]
                ends = [m.end() for m in _SENTENCE_END.finditer(cut)]
                out = cut[:ends[-1]] if ends else cut
            break
        out = f"{out}\n{p}" if out else p
    return out


def clean_wiki_text(text: str) -> str:
    """Wiki conversion: traditional -> simplified, corner quotes, bracket leftovers, en -> zh punctuation."""
    text = to_simplified(text).translate(_WIKI_QUOTES)
    for pattern, repl in _WIKI_FIXES:
        text = pattern.sub(repl, text)
    return en_to_zh_punctuation(text)


@register("wiki", patterns=("*",))
def read_wiki(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """WikiExtractor output -> (templated question about the title, first <= wiki_max_chars of the article).
    Only the part that is kept is converted (OpenCC is slow). The template depends on the title and seed only,
    so the output does not depend on file order."""
    for where, title, text in _wiki_articles(path, opts, tally):
        # convert a little more than we keep: t2s can change lengths only marginally
        answer = clean_wiki_text(wiki_answer(title, text[: opts.wiki_max_chars * 3 + len(title) + 8],
                                             opts.wiki_max_chars * 2))
        answer = wiki_answer("", answer, opts.wiki_max_chars)
        title = to_simplified(title.strip())
        if not title or not answer:
            tally.drop("empty_article", where, title or "(no title)")
            continue
        template = WIKI_TEMPLATES[zlib.crc32(f"{opts.seed}:{title}".encode()) % len(WIKI_TEMPLATES)]
        yield Record(template.format(title), answer, "wiki")


# ----------------------------------------------------------------------------------------------- text (prose)

TEXT_PATTERNS = ("*.txt", "*.md", "*.jsonl", "*.json", "*.parquet")
TEXT_SKIP = ("README*", "LICENSE*", "LICENCE*")  # a corpus folder's own notes are not its text (a file named is read)
TEXT_BLOCK_CHARS = 1 << 20  # a longer plain-text document is handed on in blocks of about this size, cut at line ends
_MAGIC = ((b"%PDF", "PDF"), (b"PK\x03\x04", "zip (docx, epub, ...)"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
          (b"\xfd7zXZ", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"7z\xbc\xaf", "7z"), (b"\x89PNG", "PNG"),
          (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"PAR1", "parquet"), (b"SQLite format", "SQLite"))
_BINARY_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\ufffd]")


def binary_file(path: Path, opts: ReaderOptions, sample_bytes: int = 1 << 13) -> str | None:
    """Why a file that should hold text is binary (a known magic number, NUL bytes, or over 30% control or
    undecodable characters in its first 8 KB), or None."""
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return f"a {kind} file, not text"
    if b"\x00" in head:
        return "NUL bytes: a binary file (or UTF-16 / UTF-32 text: convert it to UTF-8)"
    text = head.decode(opts.encoding or detect_encoding(path), errors="replace")
    if len(_BINARY_CONTROL.findall(text)) > 0.3 * len(text):
        return "mostly control or undecodable bytes: a binary file"
    return None


def _text_value(value, where: str, field_name: str, tally: Tally) -> str | None:
    """A document from a JSON / parquet field: a string (bytes are decoded as UTF-8); anything else is counted."""
    if value is None:
        tally.drop("missing_field", where, f"{field_name!r} is null")
    elif isinstance(value, str):
        return value
    elif isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            tally.drop("undecodable", where, f"utf-8: {e.reason} at byte {e.start}")
    else:
        tally.drop("bad_field", where, f"{field_name} is a {type(value).__name__}, not text")
    return None


def _json_text_file(path: Path, opts: ReaderOptions) -> bool:
    """Whether a plain-text file is really JSON lines: its first line is an object with the text field."""
    with open(path, "rb") as f:
        for raw in iter(lambda: f.readline(1 << 16), b""):
            line = raw.decode(opts.encoding or detect_encoding(path), errors="replace").strip().lstrip("\ufeff")
            if line:
                try:
                    obj = json.loads(line) if line.startswith("{") else None
                except ValueError:
                    return False
                return isinstance(obj, dict) and opts.text_field in obj
    return False


def _plain_documents(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """The documents of a plain-text file: the whole file, or the runs of lines between blank lines (doc_sep
    "blank") or between lines that read doc_sep. A document longer than TEXT_BLOCK_CHARS goes on in further records
    (`continued`), each cut at a line end, so memory stays bounded whatever the file size."""
    sep = opts.doc_sep
    lines: list[str] = []
    size, continued = 0, False
    for _, line in text_lines(path, opts, tally, count_read=False):
        if sep != "file" and (not line.strip() if sep == "blank" else line.strip().lstrip("\ufeff") == sep):
            if lines:
                yield Record("", "".join(lines), "text", continued=continued)
            lines, size, continued = [], 0, False
            continue
        if not lines and not continued:
            tally.read += 1  # a document starts
        lines.append(line)
        size += len(line)
        if size >= TEXT_BLOCK_CHARS:
            yield Record("", "".join(lines), "text", continued=continued)
            lines, size, continued = [], 0, True
    if lines:
        yield Record("", "".join(lines), "text", continued=continued)


@register("text", patterns=TEXT_PATTERNS, prose=True, skip=TEXT_SKIP)
def read_text(path: Path, opts: ReaderOptions, tally: Tally) -> Iterator[Record]:
    """Plain prose for pretraining, one record per document (the text in `response`; prepare cleans it and splits
    it into pieces). .parquet: the `text_field` column, a row a document; .json / .jsonl (an array or lines): the
    `text_field` of each object; .txt / .md and any other name: see `_plain_documents`, unless the first line is a
    JSON object holding `text_field` (JSON lines named .txt). A binary file is counted as `binary_file`, a row
    without the field as `missing_field`, an undecodable line (plain text) as `undecodable`."""
    suffix = path.suffix.lower()
    field_name = opts.text_field
    if suffix == ".parquet":
        rows = parquet_rows(path, [field_name], tally, batch_rows=256)  # documents are large: small batches
    else:
        opts = replace(opts, encoding=opts.encoding or detect_encoding(path))  # detected once, not per helper
        if problem := binary_file(path, opts):
            tally.read += 1
            tally.drop("binary_file", str(path), problem)
            return
        if suffix not in (".json", ".jsonl") and not _json_text_file(path, opts):
            yield from _plain_documents(path, opts, tally)
            return
        rows = json_objects(path, opts, tally)
    for where, row in rows:
        if field_name not in row:
            tally.drop("missing_field", where, f"no field {field_name!r}; its fields: {sorted(row)[:20]}")
            continue
        text = _text_value(row[field_name], where, field_name, tally)
        if text is not None:
            yield Record("", text, "text")


# ----------------------------------------------------------------------------------------------- corpus level

def get_reader(name: str) -> ReaderSpec:
    if name not in READERS:
        raise ValueError(f"unknown corpus format {name!r}; known: {', '.join(sorted(READERS))}")
    return READERS[name]


def list_files(name: str, path: str | Path) -> list[Path]:
    """The files of a corpus: `path` itself, or the files under a directory that match the reader's patterns
    (recursively, sorted; hidden files and names matching the reader's `skip`, case-insensitive, left out). Raises
    for a path that does not exist or holds no such file."""
    spec, path = get_reader(name), Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {name}: {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted({p for pat in spec.patterns for p in path.rglob(pat)
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                    and not any(fnmatch.fnmatch(p.name.upper(), s.upper()) for s in spec.skip)})
    if not files:
        raise FileNotFoundError(f"corpus {name}: no {' / '.join(spec.patterns)} files under {path}")
    return files


def is_blank_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return not f.read(4096).strip(b" \t\r\n\xef\xbb\xbf")


def read_file(name: str, path: Path, opts: ReaderOptions | None = None, tally: Tally | None = None) -> Iterator[Record]:
    opts, tally = opts or ReaderOptions(), tally if tally is not None else Tally()
    if is_blank_file(path):
        tally.drop("empty_file", str(path))
        return
    yield from get_reader(name).fn(path, opts, tally)


def read_corpus(name: str, path: str | Path, opts: ReaderOptions | None = None,
                tally: Tally | None = None) -> Iterator[Record]:
    """Every record of a corpus file or directory, in file order."""
    for f in list_files(name, path):
        yield from read_file(name, f, opts, tally)


def read_records(fmt: str, path: str | Path) -> list[dict]:
    """Instruction records of one file or directory as dicts (prompt, response, history, system), for SFT and
    batch prediction; a file with none readable is an error that names it and the reasons."""
    tally = Tally()
    records = [{"prompt": r.prompt, "response": r.response, "history": list(r.history), "system": r.system}
               for r in read_corpus(fmt, path, tally=tally)]
    if not records:
        raise ValueError(f"{path}: no readable {fmt} records ({tally})")
    return records
