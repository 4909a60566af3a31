"""Greedy decoding speed: our `generate` (preallocated KV cache) vs transformers `generate` on the same weights.

    python bench/generation.py --presets tiny small --new-tokens 128 --batch-sizes 1 8

Random weights (speed does not depend on them); every run generates exactly --new-tokens tokens (no stop id can
occur). Batches > 1 are left-padded (prompt lengths vary by up to half). Prints a rich table of tokens/s.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import ModelConfig, Transformer, save_model  # noqa: E402
from model.generation import SamplingConfig, generate  # noqa: E402


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [length - (i * length // (2 * batch)) for i in range(batch)]
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help="model presets to time")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes to time")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    args = parser.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    table = Table(title=f"greedy decoding, {where}, {args.dtype}, prompt <= {args.prompt_len}, "
                        f"{args.new_tokens} new tokens")
    for col in ("preset", "batch", "ours tok/s", "transformers tok/s", "ours / transformers"):
        table.add_column(col, justify="right")
    for preset in args.presets:
        torch.manual_seed(0)
        ours = Transformer(ModelConfig.preset(preset)).to(args.device, dtype).eval()
        vocab = ours.config.vocab_size
        with tempfile.TemporaryDirectory() as tmp:
            save_model(ours, Path(tmp) / "m")
            hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=dtype).to(args.device).eval()
        config = SamplingConfig(max_new_tokens=args.new_tokens, stop_ids=(vocab,))  # an id no model can produce
        for batch in args.batch_sizes:
            prompts = prompts_for(batch, args.prompt_len, vocab)
            L = max(map(len, prompts))
            ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=args.device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=args.device)

            def run_hf():
                with torch.inference_mode():
                    hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None, top_k=None,
                                top_p=None, temperature=None)

            t_ours = best_of(lambda: generate(ours, prompts, config), args.repeats)
            t_hf = best_of(run_hf, args.repeats)
            n = batch * args.new_tokens
            table.add_row(preset, str(batch), f"{n / t_ours:,.0f}", f"{n / t_hf:,.0f}", f"{t_hf / t_ours:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
