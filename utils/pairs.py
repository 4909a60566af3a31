"""Preference pairs (a prompt, a chosen and a rejected answer) from the formats users have, and their parquet files.

One reader takes every format, object by object (JSON array or JSON lines, any encoding `utils.corpora` reads, and
parquet):

    LLaMA-Factory sharegpt   {"conversations": [{"from", "value"}, ...], "chosen": {"from", "value"} | str,
                              "rejected": ... [, "system"]}          (the conversation ends with the user's turn)
    LLaMA-Factory alpaca     {"instruction", "input", "chosen", "rejected" [, "history", "system"]}
    TRL (explicit prompt)    {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}
    ours (parquet)           the same with strings, plus "source", "history" [[q, a], ...] and "system"
    ChatLM-mini-Chinese      {"question", "response_chosen", "response_rejected"}
    minimind, TRL implicit   {"chosen": [messages], "rejected": [messages]}: the shared messages before the last
                              answer are the prompt

Messages are {"role", "content"} or {"from", "value"}. Earlier user/assistant turns become `history`, a system
message `system`. A pair whose answers are equal, or with an empty answer or prompt, is dropped and counted in the
`Tally` (with the first few places), as is an object no format fits.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from utils.corpora import ReaderOptions, Tally, is_blank_file, json_objects, message_role, parquet_rows
from utils.io import atomic_dir

PATTERNS = ("*.json", "*.jsonl", "*.parquet")
PARQUET_COLUMNS = ("prompt", "chosen", "rejected", "source", "history", "system")
SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                    ("source", pa.string()), ("history", pa.list_(pa.list_(pa.string()))), ("system", pa.string())])


@dataclass(slots=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    source: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (q, a) turns, oldest first
    system: str = ""

    def record(self, answer: str) -> dict[str, Any]:
        """The conversation ending in `answer`, as `utils.templates.to_messages` takes it."""
        return {"prompt": self.prompt, "response": answer, "history": self.history, "system": self.system}


class Skip(ValueError):
    """An object that gives no pair: `reason` is the tally's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(value: Any, where: str) -> str:
    """A string, or the text of one message ({"value"} / {"content"}, or a list ending in the assistant's)."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise Skip("bad_field", f"{where}: expected text or a message, got {type(value).__name__}")
    return value


def _dialogue(messages: Any, system: str = "") -> tuple[str, list[tuple[str, str]], str]:
    """(system, history, last question) of messages that alternate user / assistant and end with the user's turn."""
    if not isinstance(messages, list) or not messages:
        raise Skip("missing_field", "no messages before the answers")
    history, pending = [], None
    for m in messages:
        role = message_role(m)
        text = _text(m, "message") if role else ""
        if role == "system" and pending is None and not history:
            system = text
        elif role == "user" and pending is None:
            pending = text
        elif role == "assistant" and pending is not None:
            history.append((pending, text))
            pending = None
        else:
            raise Skip("bad_field", "turns must alternate user / assistant and end with the user's")
    if pending is None:
        raise Skip("bad_field", "the messages end with an answer: no question for the pair")
    return system, history, pending


def _history(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in value):
        raise Skip("bad_field", "history must be a list of [question, answer] pairs")
    return [(str(q), str(a)) for q, a in value]


def parse_pair(obj: dict) -> Pair:
    """The pair in one object of any supported format; raises Skip naming why there is none."""
    system = obj.get("system") or ""
    if "conversations" in obj and "chosen" in obj:
        system, history, prompt = _dialogue(obj["conversations"], system)
        chosen, rejected, source = obj["chosen"], obj.get("rejected"), "sharegpt"
    elif "instruction" in obj and "chosen" in obj:
        prompt = "\n".join(p for p in (str(obj.get("instruction") or "").strip(), str(obj.get("input") or "").strip())
                           if p)
        history, source = _history(obj.get("history") or []), "alpaca"
        chosen, rejected = obj["chosen"], obj.get("rejected")
    elif "prompt" in obj and "chosen" in obj:
        if isinstance(obj["prompt"], list):
            system, history, prompt = _dialogue(obj["prompt"], system)
        else:
            prompt, history = _text(obj["prompt"], "prompt"), _history(obj.get("history") or [])
        chosen, rejected, source = obj["chosen"], obj.get("rejected"), obj.get("source") or "prompt"
    elif "question" in obj and "response_chosen" in obj:
        prompt, history = _text(obj["question"], "question"), []
        chosen, rejected, source = obj["response_chosen"], obj.get("response_rejected"), "question"
    elif isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        if obj["chosen"][:-1] != obj["rejected"][:-1]:
            raise Skip("prompts_differ", "chosen and rejected conversations differ before their last answers")
        system, history, prompt = _dialogue(obj["chosen"][:-1], system)
        chosen, rejected, source = obj["chosen"], obj["rejected"], "messages"
    else:
        raise Skip("unknown_format", f"no pair format fits the keys {sorted(obj)[:8]}")
    pair = Pair(prompt, _text(chosen, "chosen"), _text(rejected, "rejected"), str(source), history,
                _text(system, "system"))
    if not pair.prompt.strip():
        raise Skip("missing_field", "empty prompt")
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise Skip("empty_answer", "an empty chosen or rejected answer")
    if pair.chosen.strip() == pair.rejected.strip():
        raise Skip("same_answers", "chosen equals rejected")
    return pair


def _objects(path: Path, tally: Tally) -> Iterable[tuple[str, dict]]:
    if path.suffix == ".parquet":
        try:
            names = set(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError):
            names = set()  # parquet_rows counts the unreadable file
        yield from parquet_rows(path, [c for c in PARQUET_COLUMNS if c in names] or ["prompt"], tally)
    elif is_blank_file(path):
        tally.drop("empty_file", str(path))
    else:
        yield from json_objects(path, ReaderOptions(), tally)


def pair_files(path: str | Path) -> list[Path]:
    """`path` itself, or the pair files under a directory (recursively, sorted, hidden ones skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference pairs: {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted({p for pattern in PATTERNS for p in path.rglob(pattern)
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)})
    if not files:
        raise FileNotFoundError(f"preference pairs: no {' / '.join(PATTERNS)} files under {path}")
    return files


def read_pairs(paths: str | Path | Sequence[Path], tally: Tally | None = None) -> list[Pair]:
    """Every pair of a file, a directory or a list of files, in file order; what is dropped is counted in `tally`."""
    tally = tally if tally is not None else Tally()
    files = [Path(p) for p in paths] if isinstance(paths, (list, tuple)) else pair_files(paths)
    pairs = []
    for path in files:
        for where, obj in _objects(path, tally):
            try:
                pairs.append(parse_pair(obj))
            except Skip as e:
                tally.drop(e.reason, where, str(e))
    return pairs


def split_pairs(pairs: Sequence[Pair], valid_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, valid): round(valid_fraction x n) pairs drawn with `seed` held out (at least one when the fraction is
    positive and there are two pairs), both in file order."""
    n_valid = round(valid_fraction * len(pairs))
    if valid_fraction > 0 and len(pairs) > 1:
        n_valid = min(max(n_valid, 1), len(pairs) - 1)
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:n_valid].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def pair_splits(data: str | Path, eval_data: str | Path | None, valid_fraction: float,
                seed: int) -> tuple[list[Pair], list[Pair], Tally]:
    """The train and valid pairs of `data`: a prepared directory's train-* / valid-* shards (`write_pair_shards`);
    else every pair of the file or directory, the valid split being `eval_data`'s pairs or a held-out
    `valid_fraction`. A train split with no pair is an error naming the reasons."""
    tally, data = Tally(), Path(data)
    shards = {split: sorted(data.glob(f"{split}-*.parquet")) for split in ("train", "valid")} if data.is_dir() else {}
    if shards.get("train"):
        train, valid = read_pairs(shards["train"], tally), read_pairs(shards["valid"], tally)
    elif eval_data:
        train, valid = read_pairs(data, tally), read_pairs(eval_data, tally)
    else:
        train, valid = split_pairs(read_pairs(data, tally), valid_fraction, seed)
    if not train:
        raise ValueError(f"{data}: no usable preference pairs (read {tally.read}, dropped {dict(tally.dropped)}; "
                         f"first: {tally.examples[:3]})")
    return train, valid, tally


def write_pairs(pairs: Iterable[Pair], path: str | Path) -> None:
    """One parquet file with the columns prompt, chosen, rejected, source, history, system."""
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": p.source,
             "history": [list(t) for t in p.history], "system": p.system} for p in pairs]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def write_pair_shards(source: str | Path, out_dir: str | Path, valid_fraction: float = 0.05,
                      seed: int = 42) -> dict[str, Any]:
    """The pairs of `source` (any format above) as a prepared directory: train-00000.parquet and
    valid-00000.parquet, written atomically. Returns the counts (read, kept per split, dropped by reason)."""
    tally = Tally()
    train, valid = split_pairs(read_pairs(source, tally), valid_fraction, seed)
    with atomic_dir(out_dir) as tmp:
        write_pairs(train, tmp / "train-00000.parquet")
        write_pairs(valid, tmp / "valid-00000.parquet")
    return {"read": tally.read, "train": len(train), "valid": len(valid), "dropped": dict(tally.dropped),
            "examples": tally.examples}
