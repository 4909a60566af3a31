"""Tokenizer benchmark: peak RSS and time of `train_tokenizer`, and characters per token on held-out Chinese Q&A
beside Qwen2's.

    python bench/tokenizer.py [--corpora ../shared/corpora] [--synthetic-mb 1024] [--json out.json]

Real data: every shared corpus except BELLE trains; BELLE's Q&A (eval set + dev1K, another source and style) is
the held-out set, so chars/token is measured out of domain. Scale: the real samples are only ~12 MB, so a larger
corpus is synthesised by sampling a character bigram chain fitted on the real training text (same characters and
pair statistics, but more distinct pre-tokens than real text: a pessimistic case for the word table). Each run is a
fresh subprocess, so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def real_pairs(corpora: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out BELLE Q&A pairs) from the shared corpora samples."""
    train: list[tuple[str, str]] = []
    ts = corpora / "translational_style"
    train += [(r["问"], r["答"]) for r in map(json.loads, open(ts / "2_Dialogues.first6000.jsonl", encoding="utf-8"))]
    train += [(r["input"], r["output"]) for r in json.load(open(ts / "TslDial.json", encoding="utf-8"))]
    with open(corpora / "medical_dialogue" / "IM_neike_5000-6000_sample.csv", encoding="gb18030") as f:
        train += [(r["title"] + "\n" + r["ask"], r["answer"]) for r in csv.DictReader(f)]
    for name in ("val_hc3_QA.main.jsonl", "val_hc3_si.jsonl"):
        train += [("", r["text"]) for r in map(json.loads, open(corpora / "hc3_plus_zh" / name, encoding="utf-8"))]
    wiki = corpora / "wiki_zh" / "wiki_zh_2019" / "AA" / "wiki_00"
    train += [(r["title"], r["text"]) for r in map(json.loads, open(wiki, encoding="utf-8"))]
    msra = corpora / "msra_ner_instruct" / "eval.first800.txt"
    train += [(r["instruct"] + "\n" + r["query"], r["answer"]) for r in map(json.loads, open(msra, encoding="utf-8"))]
    belle = corpora / "belle"
    held = [(r["question"], r["std_answer"]) for r in map(json.loads, open(belle / "eval_set.json", encoding="utf-8"))]
    held += [(r["instruction"], r["output"]) for r in map(json.loads, open(belle / "dev1K.first800.json",
                                                                           encoding="utf-8"))]
    return train, held


def write_shard(path: Path, pairs: list[tuple[str, str]]) -> None:
    pq.write_table(pa.table({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs],
                             "source": ["bench"] * len(pairs)}), path, compression="zstd")


def synthesize(train: list[tuple[str, str]], out: Path, megabytes: int, held: list[tuple[str, str]],
               seed: int = 0, streams: int = 4096, shard_mb: int = 64) -> int:
    """Write about `megabytes` MB of UTF-8 text sampled from a character bigram chain as train shards."""
    text = "\n".join(p + "\n" + r for p, r in train)
    a = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    order = np.argsort(a[:-1], kind="stable")                  # positions grouped by character
    chars, starts, counts = np.unique(a[:-1][order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    state = a[rng.integers(0, len(a) - 1, streams)]
    written, shard = 0, 0
    bytes_per_char = len(text.encode("utf-8")) / len(text)
    steps = int(shard_mb * 2**20 / bytes_per_char / streams)
    while written < megabytes * 2**20:
        block = np.empty((streams, steps), dtype="<u4")
        for t in range(steps):
            k = np.searchsorted(chars, state)
            k = np.minimum(k, len(chars) - 1)
            missing = chars[k] != state                        # the last character of the text has no successor
            pick = starts[k] + (rng.random(streams) * counts[k]).astype(np.int64)
            state = np.where(missing, a[0], a[order[pick] + 1])
            block[:, t] = state
        docs = [block[i].tobytes().decode("utf-32-le") for i in range(streams)]
        pairs = [(d[j:j + 40], d[j + 40:j + 400]) for d in docs for j in range(0, len(d), 400)]
        write_shard(out / f"train-{shard:05d}.parquet", pairs)
        written += sum(len(p.encode("utf-8")) + len(r.encode("utf-8")) for p, r in pairs)
        shard += 1
    write_shard(out / "valid-00000.parquet", held)
    return written


def run(data: Path, vocab: int, out: Path, sample_bytes: int | None, compare: Path | None) -> dict:
    """train_tokenizer in a fresh interpreter; its report (peak RSS is that process's own)."""
    code = ("import json, sys; from utils.tokenizer import train_tokenizer; "
            f"r = train_tokenizer({str(data)!r}, {vocab}, {str(out)!r}, {sample_bytes!r}, "
            f"compare={None if compare is None else str(compare)!r}); print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora", help="shared corpora dir")
    ap.add_argument("--synthetic-mb", type=int, default=1024, help="size of the synthetic corpus (0: skip)")
    ap.add_argument("--sample-bytes", type=int, default=256 * 2**20, help="--sample-bytes for the synthetic run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    qwen2 = args.corpora / "tokenizers" / "qwen2"
    train, held = real_pairs(args.corpora)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = tmp / "real"
        real.mkdir()
        write_shard(real / "train-00000.parquet", train)
        write_shard(real / "valid-00000.parquet", held)
        for vocab in (32000, 8000):
            r = run(real, vocab, tmp / f"tok{vocab}", None, qwen2)
            rows.append({"run": f"real ~12 MB, vocab {vocab}", **r})
        if args.synthetic_mb:
            syn = tmp / "synthetic"
            syn.mkdir()
            start = time.perf_counter()
            size = synthesize(train, syn, args.synthetic_mb, held)
            print(f"synthesised {size / 2**20:.0f} MB in {time.perf_counter() - start:.0f} s")
            r = run(syn, 32000, tmp / "toksyn", args.sample_bytes, None)
            rows.append({"run": f"synthetic {size / 2**30:.2f} GB, vocab 32000, sample {args.sample_bytes >> 20} MB",
                         **r})
    keys = ["vocab_size", "train_seconds", "peak_rss_mb", "corpus_bytes", "trained_bytes", "distinct_words",
            "words_dropped_below_count", "chars_per_token", "compare_chars_per_token", "chars_per_token_ratio"]
    table = Table(title="tokenizer benchmark (held-out: BELLE Q&A)")
    table.add_column("run")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(r["run"], *(str(r.get(k, "")) for k in keys))
    Console(width=250).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
