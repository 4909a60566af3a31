"""Where the GPU time goes, for the next optimization: kernel tables (torch.profiler) of the decode step (eager and
compiled, `small` and 7B shapes) and of the compiled `small` pretraining step, plus inductor's perf hints.

    TORCH_LOGS=perf_hints python bench/profile_gpu.py [--only decode_small decode_7b pretrain_small] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import LLAMA_7B, SMALL, VOCAB, build, free, train_step_fn  # noqa: E402


def table(fn, out: Path, name: str, rows: int = 18) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    (out / f"{name}.txt").write_text(text)
    print(f"== {name}\n{text}", flush=True)


def decode(out: Path, label: str) -> None:
    from model.generation import SamplingConfig, generate
    model = build("ours", SMALL if label == "small" else LLAMA_7B, torch.bfloat16).eval()
    config = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=32, stop_ids=(VOCAB + 1,), seed=0)
    ids = list(range(1, 65))
    with torch.inference_mode():
        for compiled in (False, True):
            for _ in range(2):  # compile + warm-up
                generate(model, [ids], config, compile=compiled)
            table(lambda: generate(model, [ids], config, compile=compiled), out,
                  f"decode_{label}_{'compiled' if compiled else 'eager'}_32_tokens")
    del model
    free()


def pretrain_small(out: Path) -> None:
    model = build("ours", SMALL, torch.float32).train()
    batch = torch.randint(0, VOCAB, (32, 1025), device="cuda")
    step = train_step_fn(torch.compile(model), "ours", batch, list(model.parameters()))
    for _ in range(3):
        step()
    table(step, out, "pretrain_small_compiled_step")


PROFILES = {"decode_small": lambda out: decode(out, "small"), "decode_7b": lambda out: decode(out, "7b"),
            "pretrain_small": pretrain_small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        PROFILES[name](out)


if __name__ == "__main__":
    main()
