"""bench/profile_gpu.py's reading of the CUDA allocator's trace (pure Python: checked here on synthetic traces)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from profile_gpu import peak_of_trace, where  # noqa: E402


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
