"""Where the GPU time goes, for the next optimization: kernel tables (torch.profiler) of the decode step (eager and
compiled, `small` and 7B shapes), of the compiled `small` pretraining step and of the compiled 7B LoRA step, each
with a summary by kernel kind (matmul, attention, fused elementwise, optimizer, other), plus inductor's perf hints.
For the training steps also the GPU's idle time between kernels and what the host was doing when each gap ended
(timed as bench/gpu.py times them: synchronized after every step), and for the LoRA step where its peak memory is
reached and which blocks are alive there (the allocator's trace).

    TORCH_LOGS=perf_hints python bench/profile_gpu.py [--only decode_small decode_7b pretrain_small lora_7b] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import linecache
import re
import sys
import tempfile
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


def peak_of_trace(trace: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """Replay an allocator trace (`torch.cuda.memory._snapshot()["device_traces"][device]`): the most bytes allocated
    at once over the level where recording began, the index of the entry that reached it, and the blocks made during
    the trace and alive there (address -> entry). A block made before recording and freed during it counts negative."""
    live: dict[int, dict] = {}
    now = peak = peak_at = 0
    peak_live: dict[int, dict] = {}
    for i, entry in enumerate(trace):
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
            now += entry["size"]
            if now > peak:
                peak, peak_at, peak_live = now, i, dict(live)
        elif entry["action"] == "free_requested":
            now -= live.pop(entry["addr"])["size"] if entry["addr"] in live else entry["size"]
    return peak, peak_at, peak_live


def where(frames: list[dict], depth: int = 3) -> str:
    """The innermost `depth` Python frames outside torch itself (inductor's generated code counts as ours), with the
    line of code of each: the graph buffer or the model line that made an allocation."""
    parts = []
    for f in frames:
        name = f["filename"]
        if not name.endswith(".py") or ("site-packages/torch" in name and "torchinductor" not in name):
            continue
        code = linecache.getline(name, f["line"]).strip()[:100]
        parts.append(f"{Path(name).name}:{f['line']} `{code}`")
        if len(parts) == depth:
            break
    return " <- ".join(parts) or "(no Python frame)"


def memory_peak(fn, out: Path, name: str, top: int = 30) -> None:
    """One call of `fn` under the allocator's recorder: the peak, when it came, and the blocks alive at it by origin."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    try:
        fn()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, at, live = peak_of_trace(trace)
    by_origin: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in live.values():
        group = by_origin[where(entry["frames"])]
        group[0] += entry["size"]
        group[1] += 1
    lines = [f"{name}: peak {(base + peak) / 2**30:.3f} GiB ({base / 2**30:.3f} before the call) at trace entry "
             f"{at} of {len(trace)}, in {where(trace[at]['frames'])}",
             f"blocks made in the call and alive at the peak: {len(live)}, "
             f"{sum(e['size'] for e in live.values()) / 2**30:.3f} GiB (inductor reuses buffers, so an origin is "
             f"where a block was first allocated)", "", "| MiB | blocks | allocated at |", "|---|---|---|"]
    lines += [f"| {size / 2**20:.1f} | {count} | {origin} |"
              for origin, (size, count) in sorted(by_origin.items(), key=lambda kv: -kv[1][0])[:top]]
    text = "\n".join(lines)
    (out / f"{name}.txt").write_text(text + "\n")
    print(f"== {name}\n{text}", flush=True)


GPU_CATS, LAUNCH_CATS, HOST_CATS = ("kernel", "gpu_memcpy", "gpu_memset"), ("cuda_runtime", "cuda_driver"), \
    ("cpu_op", "user_annotation", "python_function")


def idle_gaps(events: list[dict], steps: int, min_gap_us: float = 5.0, top: int = 12) -> str:
    """GPU idle time in a profiled run (chrome-trace events of torch.profiler), grouped by what the host was doing.

    A gap is a stretch of at least `min_gap_us` with no kernel, copy or memset running on any stream. It is charged
    to the innermost host op (on the launching thread) that enclosed the launch of the kernel that ended it: if that
    launch came after the GPU fell idle, the host set the pace there. A kernel launched before the gap began was
    waiting on something else (another stream, an event), and is counted as such.
    """
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU activity in the trace"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    host = [e for e in events if e.get("cat") in HOST_CATS and e.get("ph") == "X"]

    def innermost(t: float, tid) -> str:
        around = [e for e in host if e["tid"] == tid and e["ts"] <= t <= e["ts"] + e["dur"]]
        return min(around, key=lambda e: e["dur"])["name"][:90] if around else "(no host op recorded)"

    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    gaps = []
    busy_until = gpu[0]["ts"] + gpu[0]["dur"]
    for kernel in gpu[1:]:
        gap = kernel["ts"] - busy_until
        if gap >= min_gap_us:
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            if launch is None:
                cause = "(launch not recorded)"
            elif launch["ts"] < busy_until:
                cause = "(launched before the gap: waiting on another stream or event)"
            else:
                cause = innermost(launch["ts"], launch["tid"])
            groups[cause][0] += 1
            groups[cause][1] += gap
            gaps.append((gap, cause, kernel["name"][:60]))
        busy_until = max(busy_until, kernel["ts"] + kernel["dur"])
    span = (busy_until - gpu[0]["ts"]) / 1e3 / steps
    idle = sum(g for g, _, _ in gaps) / 1e3 / steps
    lines = [f"GPU span {span:.2f} ms per step, idle {idle:.2f} ms in gaps of at least {min_gap_us:g} us "
             f"({100 * idle / span:.1f}%)", "", "| host op when the gap ended | gaps per step | idle ms per step |",
             "|---|---|---|"]
    lines += [f"| `{cause}` | {n / steps:g} | {ms / 1e3 / steps:.2f} |"
              for cause, (n, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]]
    lines += ["", "| longest gaps (us) | host op | next kernel |", "|---|---|---|"]
    lines += [f"| {gap:.0f} | `{cause}` | `{kernel}` |" for gap, cause, kernel in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)


def table(fn, out: Path, name: str, rows: int = 25, steps: int = 1) -> None:
    """Kernel tables and idle gaps of `steps` calls of `fn`, each followed by a synchronize (as bench/gpu.py times
    them; the kernels are the same without it)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    text += f"\n\n{name}, per step:\n{by_kind(prof, steps)}\n"
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    text += f"\n{name}, idle GPU time, synchronized after each step:\n{idle_gaps(events, steps)}\n"
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
            table(lambda model=model: generate(model, [ids], config, compile=compiled), out,
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
    from trainer.activations import ActivationPolicy, apply_activation_policy
    model = build("ours", LLAMA_7B, torch.bfloat16)
    apply_lora(model, r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
    apply_activation_policy(model, ActivationPolicy(checkpointing=True))
    model.train()
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    step = train_step_fn(torch.compile(model), "ours", batch, [p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        step()
    table(step, out, "lora_7b_compiled_step", steps=2)
    memory_peak(step, out, "lora_7b_compiled_memory_peak")
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
