"""utils/threads.py: torch gets one thread per core free to the process; OMP_NUM_THREADS, when set, decides."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import threads

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("load, cores, expected", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.2, 2, 1), (6.0, 2, 1),
                                                   (2.5, 8, 6), (0.0, 1, 1)])
def test_free_cores_are_the_affinity_less_the_load(monkeypatch, load, cores, expected):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert threads.free_cores() == expected


def test_no_load_average_counts_every_core_free(monkeypatch):
    def unavailable():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", unavailable)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert threads.free_cores() == 3


def test_use_free_cores_sets_torch_and_the_environment_unless_the_user_did(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert threads.use_free_cores() == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert threads.use_free_cores() is None  # the user's choice stands
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)


def test_a_fresh_process_gets_its_threads_before_torch_starts():
    """train.py's cli() runs use_free_cores() before any torch import: torch starts with that count."""
    code = "from utils.threads import use_free_cores as u; n = u(); import torch; print(n, torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
                         check=True).stdout.split()
    assert out[0] == out[1] and 1 <= int(out[0]) <= len(os.sched_getaffinity(0))
