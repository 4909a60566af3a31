"""Where the GPU time goes, for the next optimization: kernel tables (torch.profiler) of the decode step (eager and
compiled, `small` and 7B shapes), of the compiled `small` pretraining step and of the compiled 7B LoRA step, each
with a summary by kernel kind (matmul, attention, fused elementwise, optimizer, other), plus inductor's perf hints.

    TORCH_LOGS=perf_hints python bench/profile_gpu.py [--only decode_small decode_7b pretrain_small lora_7b] [--out DIR]
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import LLAMA_7B, SMALL, VOCAB, build, free, train_step_fn  # noqa: E402

KINDS = {  # first match wins; kernel names of cuDNN / flash / cuBLAS / inductor / fused optimizers
    "attention": r"flash|fmha|cudnn|attention|sdpa",
    "matmul": r"gemm|nvjet|cutlass|xmma|sm90_|splitk|cublas",
    "optimizer": r"adam|multi_tensor|foreach",
    "fused elementwise (triton)": r"^triton_",
    "copy / fill": r"copy|memcpy|memset|fill|cat",
}


def by_kind(prof, steps: int, top: int = 30) -> str:
    """Milliseconds of kernel time per step, summed by kind, then the `top` kernels, as markdown tables."""
    totals: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.key_averages():
        if evt.device_type != DeviceType.CUDA or evt.self_device_time_total <= 0:
            continue
        kind = next((k for k, rx in KINDS.items() if re.search(rx, evt.key, re.I)), "other")
        ms = evt.self_device_time_total / 1e3 / steps
        totals[kind] += ms
        kernels.append((ms, evt.count / steps, kind, evt.key[:100]))
    whole = sum(totals.values())
    rows = [f"| {k} | {ms:.2f} | {100 * ms / whole:.1f}% |" for k, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines = ["| kernel kind | ms per step | share |", "|---|---|---|", *rows, f"| all | {whole:.2f} | |", "",
             "| kernel | kind | calls per step | ms per step |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {kind} | {calls:g} | {ms:.2f} |" for ms, calls, kind, name in sorted(kernels)[::-1][:top]]
    return "\n".join(lines)


def table(fn, out: Path, name: str, rows: int = 25, steps: int = 1) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    text += f"\n\n{name}, per step:\n{by_kind(prof, steps)}\n"
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
    table(step, out, "pretrain_small_compiled_step", steps=3)
    del model, step
    free()


def lora_7b(out: Path) -> None:
    """Our LoRA r=8 on q_proj, v_proj of the 7B shape, compiled, checkpointing, 4x1024 (bench/gpu.py's settings)."""
    from model.lora import apply_lora
    model = build("ours", LLAMA_7B, torch.bfloat16)
    apply_lora(model, r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
    model.gradient_checkpointing = True
    model.train()
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    step = train_step_fn(torch.compile(model), "ours", batch, [p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        step()
    table(step, out, "lora_7b_compiled_step", steps=2)
    del model, step
    free()


PROFILES = {"decode_small": lambda out: decode(out, "small"), "decode_7b": lambda out: decode(out, "7b"),
            "pretrain_small": pretrain_small, "lora_7b": lora_7b}


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
