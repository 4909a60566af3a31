"""CMMLU scoring speed: `utils.knowledge.score` (batched, left-padded, the last position's logits only) against the
loop a user would otherwise write with transformers (one question at a time, the official letter-logit method), on
random weights of the `small` preset and of the Llama-7B shape, with the LLaMA tokenizer (GPU, bf16).

    python bench/eval_knowledge.py --data ../shared/eval/cmmlu --tokenizer ../shared/corpora/tokenizers/llama \
        [--shapes small llama7b] [--batch-size 32] [--reference-questions 500] --out /tmp/bench

Ours scores the whole test split, tokenization included; the reference loop runs on its first
`--reference-questions` questions (it needs minutes for all of them at 7B), so both are reported as questions/s.
Writes DIR/results.json and DIR/results.md as bench/gpu.py does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gpu import LLAMA_7B, SMALL, Report, build, free  # noqa: E402

from utils.knowledge import load_questions, plain_prompt, score  # noqa: E402
from utils.tokenizer import Tokenizer  # noqa: E402

SHAPES = {"small": SMALL, "llama7b": LLAMA_7B}


@torch.no_grad()
def reference_seconds(hf, tokenizer, questions) -> float:
    """transformers, one question at a time: the prompt's next-token logits over the ids of " A".." D"'s letters."""
    letters = [tokenizer.encode("答案是：" + c)[-1] for c in "ABCD"]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for q in questions:
        ids = torch.tensor([tokenizer.encode(plain_prompt(q))], device="cuda")
        hf(input_ids=ids, logits_to_keep=1).logits[0, -1, letters].argmax().item()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "eval" / "cmmlu"), help="CMMLU directory")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "corpora" / "tokenizers" / "llama"))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference-questions", type=int, default=500)
    parser.add_argument("--out", default="bench", help="where results.json / results.md go")
    parser.add_argument("--commit", default="unknown", help="commit being measured")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/eval_knowledge.py needs CUDA")
    report = Report(Path(args.out), args.commit)
    tokenizer = Tokenizer.load(args.tokenizer)
    questions = load_questions("cmmlu", args.data, "test")
    for shape in args.shapes:
        cfg = SHAPES[shape]
        model = build("ours", cfg, torch.bfloat16).eval()
        score(model, tokenizer, questions[:64], batch_size=args.batch_size)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        score(model, tokenizer, questions, batch_size=args.batch_size)
        torch.cuda.synchronize()
        ours = time.perf_counter() - start
        del model
        free()
        hf = build("hf", cfg, torch.bfloat16).eval()
        subset = questions[:args.reference_questions]
        reference_seconds(hf, tokenizer, subset[:8])  # warm-up
        ref = reference_seconds(hf, tokenizer, subset)
        del hf
        free()
        report.add(f"cmmlu_letter_{shape}", len(questions) / ours, len(subset) / ref, "questions/s",
                   questions=len(questions), seconds=round(ours, 1), batch_size=args.batch_size,
                   reference_is="transformers, one question at a time")


if __name__ == "__main__":
    main()
