"""Evaluation speed: batched left-padded greedy generation vs one prompt at a time, and the answer-loss pass.

    python bench/eval_speed.py --records 64 --max-new-tokens 64 --batch-sizes 1 8 32 --preset tiny

Real prompts and answers: the BELLE eval set in ../shared/corpora (question / std_answer). The tokenizer is trained
on the BELLE dev file with the preset's vocabulary size; the model is the preset with random weights. A random model
rarely emits a stop token, so every answer runs to --max-new-tokens: the worst case for batching, where the batch's
longest answer decides its length. Each batch size also reports how many answers equal the batch-size-1 answers.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402
from model.chat import resolve_device, resolve_dtype  # noqa: E402
from model.generation import (
    SamplingConfig,  # noqa: E402
    generate_answers,  # noqa: E402
)
from utils.metrics import answer_loss  # noqa: E402
from utils.templates import get_template  # noqa: E402
from utils.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "belle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=64, help="eval records (BELLE eval set, in file order)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="generation batch sizes")
    parser.add_argument("--preset", default="tiny", help="model shape (random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--belle", type=Path, default=CORPORA, help="folder with eval_set.json and dev1K.first800.json")
    args = parser.parse_args()

    lines = (args.belle / "eval_set.json").read_text(encoding="utf-8").splitlines()[:args.records]
    records = [{"prompt": o["question"], "response": o["std_answer"]} for o in map(json.loads, lines)]
    config = ModelConfig.preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer([args.belle / "dev1K.first800.json"], config.vocab_size, Path(tmp) / "tok", template="chatml",
                        show_progress=False)
        tok = Tokenizer.load(Path(tmp) / "tok")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                           pad_token_id=tok.pad_id, max_position_embeddings=2048))
    model = model.to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()
    template = get_template("chatml")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    table = Table(title=f"eval speed · {args.preset} ({model.num_parameters() / 1e6:.1f}M params) · {device} "
                        f"{str(next(model.parameters()).dtype).removeprefix('torch.')} · {len(records)} BELLE "
                        f"prompts · {args.max_new_tokens} new tokens")
    for column in ("pass", "seconds", "throughput", "same answers as batch 1"):
        table.add_column(column, justify="right")
    reference = None
    for bs in args.batch_sizes:
        generate_answers(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in records[:bs]], template,
                         sampling, bs, False)  # warm-up
        _sync(device)
        start = time.perf_counter()
        answers, n_tokens = generate_answers(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in records],
                                             template, sampling, bs, False)
        _sync(device)
        seconds = time.perf_counter() - start
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        table.add_row(f"generate, batch {bs}", f"{seconds:.2f}", f"{n_tokens / seconds:,.0f} tokens/s",
                      f"{same}/{len(answers)}")
    answer_loss(model, tok, records[:4], template, progress=False)
    _sync(device)
    start = time.perf_counter()
    loss = answer_loss(model, tok, records, template, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    table.add_row("answer loss (8192 tokens/batch)", f"{seconds:.2f}",
                  f"{loss['answer_tokens'] / seconds:,.0f} answer tokens/s", "")
    Console().print(table)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
