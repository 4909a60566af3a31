"""bench/profile_gpu.py's reading of the CUDA allocator's trace (pure Python: checked here on synthetic traces)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from profile_gpu import idle_gaps, peak_of_trace, where  # noqa: E402


def alloc(addr: int, size: int) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": []}


def free(addr: int, size: int) -> dict:
    return {"action": "free_requested", "addr": addr, "size": size, "frames": []}


def test_peak_counts_blocks_freed_from_before_the_recording():
    trace = [alloc(1, 100), alloc(2, 50), free(1, 100), alloc(3, 200),  # 250 bytes: the peak
             free(9, 30),  # made before recording began: the level falls below what the trace alone shows
             alloc(4, 10),  # 230, not 260
             {"action": "free_completed", "addr": 2, "size": 50, "frames": []}, free(3, 200)]
    peak, at, live = peak_of_trace(trace)
    assert (peak, at) == (250, 3)
    assert sorted(live) == [2, 3]


def test_where_names_the_innermost_python_frames_outside_torch_with_their_code():
    source = REPO / "model" / "transformer.py"
    lines = source.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("def apply_rotary(")) + 1  # its return
    frames = [{"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
              {"filename": "/venv/lib/python3.12/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call"},
              {"filename": str(source), "line": line, "name": "apply_rotary"}]
    assert where(frames) == f"transformer.py:{line} `return x * cos + rotate_half(x) * sin`"
    assert where(frames[:2]) == "(no Python frame)"


def test_idle_gaps_are_charged_to_the_host_op_that_launched_late_or_to_a_wait():
    def op(name, ts, dur, tid=1, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}

    def kernel(name, ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "pid": 0,
                "args": {"correlation": corr}}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
                "pid": 1, "args": {"correlation": corr}}

    events = [
        op("Optimizer.step#AdamW.step", 0, 500, cat="user_annotation"), op("aten::_fused_adamw_", 380, 100),
        kernel("gemm", 0, 100, 1), launch(1, 1),
        kernel("adam", 400, 50, 2), launch(390, 2),  # 300 us idle: launched at 390, inside _fused_adamw_
        kernel("gemm2", 420, 100, 3),  # overlaps on another stream: no gap
        kernel("attn", 560, 40, 4), launch(100, 4, tid=2),  # 40 us idle, launched long before: a wait
        kernel("tiny", 602, 1, 5), launch(3, 5),  # 2 us: under the threshold
    ]
    text = idle_gaps(events, steps=2, min_gap_us=5)
    assert text.startswith("GPU span 0.30 ms per step, idle 0.17 ms")  # (603 us, 340 us) over 2 steps
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0] == "| `aten::_fused_adamw_` | 0.5 | 0.15 |"
    assert rows[1] == "| `(launched before the gap: waiting on another stream or event)` | 0.5 | 0.02 |"
    assert "| 300 | `aten::_fused_adamw_` | `adam` |" in text
