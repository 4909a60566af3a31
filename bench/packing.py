"""Data-stage throughput on real Chinese Q/A records (../shared/corpora): token-cache build, per-epoch packing plan,
batch assembly, SFT tokenization, and the packing efficiency of each.

    python bench/packing.py [--copies 4] [--seq-len 512]

The records are the shared samples (translational-style dialogues, BELLE, Toyhom medical dialogues), repeated
`--copies` times (with a copy index in the prompt, so no two documents are equal) to get a measurable volume.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.data import best_fit_pack, pretrain_loader, sft_loader  # noqa: E402
from utils.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"



def ms_per_batch(loader, batches: int = 100) -> float:
    """Milliseconds to assemble one batch, after the first (which builds the epoch's plan)."""
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) * 1000 / batches

def real_records() -> list[tuple[str, str]]:
    recs = []
    for line in open(CORPORA / "translational_style" / "2_Dialogues.first6000.jsonl", encoding="utf-8"):
        r = json.loads(line)
        recs.append((r["问"], r["答"]))
    recs += [(r["input"], r["output"]) for r in json.load(open(CORPORA / "translational_style" / "TslDial.json"))]
    for line in open(CORPORA / "belle" / "eval_set.json", encoding="utf-8"):
        r = json.loads(line)
        recs.append((r["question"], r["std_answer"]))
    with open(CORPORA / "medical_dialogue" / "IM_neike_5000-6000_sample.csv", encoding="gb18030", newline="") as f:
        recs += [(row["ask"], row["answer"]) for row in csv.DictReader(f)]
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=4, help="times the real records are repeated")
    ap.add_argument("--seq-len", type=int, default=512, help="pretraining row length / SFT max length")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per batch")
    args = ap.parse_args()

    base = real_records()
    recs = [(f"{p}（{c}）" if c else p, r) for c in range(args.copies) for p, r in base]
    rows = Table(title=f"data stage: {len(recs):,} real Q/A records ({len(base):,} x {args.copies}), "
                       f"seq_len {args.seq_len}, batch {args.batch_size}")
    for col in ("tokenizer", "measure", "value"):
        rows.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "corpus"
        data.mkdir()
        for s in range(4):
            part = recs[s::4]
            pq.write_table(pa.table({"prompt": [p for p, _ in part], "response": [r for _, r in part],
                                     "source": ["bench"] * len(part)}), data / f"train-{s:05d}.parquet",
                           compression="zstd")
        chars = sum(len(p) + 1 + len(r) for p, r in recs)
        train_tokenizer([data / "train-00000.parquet"], 8000, tmp / "ours")
        for name, tok in [("ours 8k (uint16)", Tokenizer.load(tmp / "ours")),
                          ("qwen2 151k (uint32)", Tokenizer.load(CORPORA / "tokenizers" / "qwen2"))]:
            t = time.perf_counter()
            loader = pretrain_loader(data, tok, "train", args.seq_len, args.batch_size, cache_dir=tmp / name[:4])
            build = time.perf_counter() - t
            t = time.perf_counter()
            plan = best_fit_pack(loader.lengths, loader.capacity,
                                 np.random.default_rng(0).permutation(len(loader.lengths)), overlap=loader.overlap)
            pack = time.perf_counter() - t
            batch_ms = ms_per_batch(loader)
            rep = loader.report
            rows.add_row(name, "token cache build", f"{build:.2f} s = {len(recs) / build:,.0f} docs/s, "
                                                    f"{chars / build / 1e6:.2f} M chars/s")
            rows.add_row(name, "tokens, chars/token", f"{loader.cache.n_tokens:,}, {loader.chars_per_token:.3f}")
            rows.add_row(name, "epoch packing plan", f"{pack:.3f} s ({len(recs) / pack / 1e6:.2f} M docs/s)")
            rows.add_row(name, "pretrain batch assembly", f"{batch_ms:.2f} ms / batch")
            rows.add_row(name, "pretrain crop / drop / pad", f"{rep['crop_fraction']:.2%} / {rep['drop_fraction']:.2%}"
                                                             f" / {rep['pad_fraction']:.2%}")
            rows.add_row(name, "  rows opening with a continued doc", f"{rep['continued_fraction']:.2%}")
            del plan
            t = time.perf_counter()
            sft = sft_loader(recs, tok, "chatml", args.seq_len, batch_size=args.batch_size)
            sft_s = time.perf_counter() - t
            sft_ms = ms_per_batch(sft)
            srep = sft.report
            rows.add_row(name, "SFT tokenize + first plan", f"{sft_s:.2f} s = {len(recs) / sft_s:,.0f} examples/s")
            rows.add_row(name, "SFT batch assembly", f"{sft_ms:.2f} ms / batch")
            rows.add_row(name, "SFT pad fraction, examples/row",
                         f"{srep['pad_fraction']:.2%}, {srep['examples'] / srep['rows']:.2f} "
                         f"(truncated {srep['truncated']})")
    Console().print(rows)


if __name__ == "__main__":
    main()
